"""The bundled four-domain sample corpus and its tokenizer (``bam-build-sample-data``)."""

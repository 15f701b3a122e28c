"""Using a trained model: KV-cache generation on megatron-core's static inference context.

| module | what |
|---|---|
| ``load.py`` | a checkpoint -> its model, built for inference at this run's layout, and its tokenizer |
| ``cache.py`` | the inference context (KV cache) and its exact size |
| ``pipeline.py`` | one forward step of the model at any TP / PP / EP layout |
| ``lockstep.py`` | prompts spread over data-parallel ranks; shapes agreed so collectives line up |
| ``sampling.py`` | greedy, temperature, top-k, top-p; log-probabilities |
| ``generate.py`` | the generation loop (prefill, then one token per step from the cache) |
"""

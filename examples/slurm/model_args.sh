# Shared model shape of the templates: the paper's small seed (6 layers, d 1024, 8 heads,
# SwiGLU 4096, RoPE, untied embeddings). Sourced by the *.sbatch files.
MODEL_ARGS=(
  --num-layers 6 --hidden-size 1024 --num-attention-heads 8 --ffn-hidden-size 4096
  --seq-length 2048 --max-position-embeddings 2048 --swiglu --normalization RMSNorm
  --position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights
  --hidden-dropout 0 --attention-dropout 0
)
TOKENIZER_ARGS=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "${TOKENIZER:-data/tokenizer.json}")

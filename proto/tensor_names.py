"""GGUF weight-tensor names that both sides read: the server's weight access and registry, the client's
analyses that fetch weights (`c.weights(name)`). The same for every family lmscope supports; `{L}` is the
block index.
"""

TOKEN_EMBEDDING = "token_embd.weight"
OUTPUT = "output.weight"        # absent when the head is tied to TOKEN_EMBEDDING
OUTPUT_BIAS = "output.bias"
OUTPUT_NORM = "output_norm.weight"
OUTPUT_NORM_BIAS = "output_norm.bias"
ATTN_NORM = "blk.{L}.attn_norm.weight"
FFN_NORM = "blk.{L}.ffn_norm.weight"
POST_ATTN_NORM = "blk.{L}.post_attention_norm.weight"
POST_FFN_NORM = "blk.{L}.post_ffw_norm.weight"
ATTN_OUTPUT_BIAS = "blk.{L}.attn_output.bias"
FFN_DOWN = "blk.{L}.ffn_down.weight"  # its columns are the FFN neurons' value vectors (dense FFNs)


def head_tensor_name(tied: bool) -> str:
    """The LM head of a model whose ModelInfo says `tied_embeddings`."""
    return TOKEN_EMBEDDING if tied else OUTPUT

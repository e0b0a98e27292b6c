"""One model-level ``impl`` mapped onto each op family's accepted values."""

_ACCEPTED = {
    "embedding": ("auto", "cpp", "cuda", "reference"),
    "attention": ("auto", "cpp", "triton", "reference"),
    "loss": ("auto", "cpp", "triton", "reference"),
    "retrieval": ("auto", "cpp", "cuda", "reference"),
    "dropout": ("auto", "cpp", "reference"),
}
MODEL_IMPLS = ("auto", "cpp", "cuda", "triton", "reference")


def op_impl(impl: str, family: str) -> str:
    """``impl`` when the family accepts it, else "auto" (e.g. "triton" for the CUDA-only embedding)."""
    if impl not in MODEL_IMPLS:
        raise ValueError(f"impl must be one of {MODEL_IMPLS}, got {impl!r}")
    return impl if impl in _ACCEPTED[family] else "auto"

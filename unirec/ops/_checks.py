"""Input checks shared by the ops' Python side."""
import torch


def same_device(ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """The C++ kernels' device check (same message), for the fake kernels: when one input is on the meta device
    the dispatcher runs the fake kernel instead of the C++ one, which would return an unfilled tensor."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must be on "
                             "one device")

"""PyTorch mirrors of snapjax's models, their weight files and diffusers folders."""

from export.torch.mirror import (build_mirror, export_state_dict, load_mirror, mirror_from_params,
                                 save_mirror)

__all__ = ["build_mirror", "export_state_dict", "load_mirror", "mirror_from_params", "save_mirror"]

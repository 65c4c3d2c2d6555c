"""Files and model specs: safe loading, atomic writing, and ``torchvision:resnet50``-style
names (the CLI and :func:`repcompiler.export` build on them).

* :mod:`.atomic`: every output is written atomically; errors name the destination;
* :mod:`.loading`: state dicts load with ``weights_only=True``; whole pickled models
  only with ``trust_pickle=True``; files that are not checkpoints are named as such;
* :mod:`.specs`: ``torchvision:NAME``, ``timm:NAME``, ``package.module:factory``.
"""

from __future__ import annotations

from .atomic import atomic_dir, atomic_path, atomic_write_bytes, check_output_path, save_atomic
from .loading import load_pickled_model, load_state_dict, load_weights_into
from .specs import ModelSpec, build_model, load_model, parse_model_spec, parse_shape

__all__ = [
    "ModelSpec",
    "parse_model_spec",
    "build_model",
    "load_model",
    "load_state_dict",
    "load_weights_into",
    "load_pickled_model",
    "atomic_path",
    "atomic_dir",
    "atomic_write_bytes",
    "save_atomic",
    "parse_shape",
    "check_output_path",
]

"""What the CLI's commands share: exit codes, stdout, argument types and loading the
MODEL argument.

Owns :data:`PROG`, the ``EXIT_*`` codes, :func:`out`, the argparse types
(:func:`shape_arg`, :func:`json_object_arg`, :func:`policy_arg`: a malformed value is a
usage error, exit 2), :func:`transform_kwargs`, :func:`load_model_arg` and
:func:`example_input`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch import nn

from ..errors import RepCompilerError
from ..io import check_output_path, load_model, parse_shape
from ..io.loading import TRANSFORM_HINT
from ..analysis.policy import POLICIES
from ..transforms.orepa import orepa_transform

__all__ = [
    "PROG",
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_USAGE",
    "EXIT_VERIFY",
    "EXIT_INTERRUPT",
    "out",
    "shape_arg",
    "json_object_arg",
    "policy_arg",
    "transform_kwargs",
    "load_model_arg",
    "example_input",
]

PROG = "repcompiler"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_VERIFY, EXIT_INTERRUPT = 0, 1, 2, 3, 130


def out(text: str = "") -> None:
    """Write one result line (or block) to stdout."""
    sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))
    sys.stdout.flush()


def shape_arg(text: str) -> tuple[int, ...]:
    """argparse type of ``--input-shape``: ``"1,3,224,224"`` -> ``(1, 3, 224, 224)``."""
    try:
        return parse_shape(text)
    except RepCompilerError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _json(text: str, example: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e.msg}); expected e.g. {example}") from None


def json_object_arg(text: str) -> dict[str, Any]:
    """argparse type of ``--model-kwargs``: a JSON object."""
    value = _json(text, "'{\"num_classes\": 10}'")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object like '{{\"num_classes\": 10}}'")
    return value


def policy_arg(text: str) -> str | dict[str, str | None]:
    """argparse type of ``--policy``: a built-in policy name (``paper``, ``all``: see
    :data:`repcompiler.analysis.policy.POLICIES`) or a JSON object of name pattern -> block name or null."""
    if text in POLICIES:
        return text
    if not text.lstrip().startswith("{"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a built-in policy ({', '.join(POLICIES)}) or a JSON object of pattern -> block name "
            "or null")
    value = _json(text, "'{\"layer4.*\": \"dbb\", \"fc\": null}'")
    if not isinstance(value, dict) or not all(isinstance(v, (str, type(None))) for v in value.values()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object of pattern -> block name or null")
    return value


def transform_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``orepa_transform`` keyword arguments from the transform options."""
    kwargs: dict[str, Any] = dict(
        block=args.block,
        mode=args.mode,
        scaling=args.scaling,
        post_bn=not args.no_post_bn,
        insert_bn=False if args.no_insert_bn else None,  # None: the transform's default for its init
    )
    if args.policy is not None:
        kwargs["policy"] = args.policy
    elif args.skip:
        kwargs["policy"] = list(args.skip)
    return kwargs


def load_model_arg(args: argparse.Namespace, *, orepa: bool) -> nn.Module:
    """Build/load the MODEL argument; with ``orepa``, transform before loading ``--weights``."""
    if getattr(args, "output", None):
        check_output_path(args.output)  # fail before the expensive work

    def prepare(m: nn.Module, **overrides: Any) -> nn.Module:
        return orepa_transform(m, inplace=True, **{**transform_kwargs(args), **overrides})

    try:
        return load_model(
            args.model,
            weights=args.weights,
            trust_pickle=args.trust_pickle,
            model_kwargs=args.model_kwargs,
            prepare=prepare if orepa else None,
        )
    except RepCompilerError as e:
        if not orepa or args.weights is None or "does not match" not in str(e):
            raise
        hint = _policy_hint(args, prepare)
        if hint is None:
            raise
        raise RepCompilerError(f"{str(e).replace(TRANSFORM_HINT, '')}: {hint}") from e


def _policy_hint(args: argparse.Namespace, prepare: Any) -> str | None:
    """Which built-in ``--policy`` (or no ``--orepa``) the ``--weights`` state dict's keys
    fit, when the transform this command ran does not; ``None`` when none does."""
    from ..io import load_state_dict

    keys = set(load_state_dict(args.weights))
    used = args.policy if isinstance(args.policy, str) else ("paper" if args.policy is None and not args.skip else None)

    def fits(transform: Any) -> bool:
        model = load_model(args.model, trust_pickle=args.trust_pickle, model_kwargs=args.model_kwargs,
                           prepare=transform)
        return set(model.state_dict()) == keys

    for name in POLICIES:
        if name != used and fits(lambda m: prepare(m, policy=name)):
            return (f"the weights were saved from the model transformed with --policy {name}, this command "
                    f"transformed it with {'--policy ' + used if used else 'the given --policy/--skip'}: "
                    f"pass --policy {name}")
    if fits(None):
        return "the weights are the untransformed model's: drop --orepa"
    return None


def example_input(args: argparse.Namespace, default: tuple[int, ...] | None) -> torch.Tensor | None:
    """A random input of ``--input-shape`` (or ``default``), seeded by ``--seed``."""
    shape = args.input_shape or default
    if shape is None:
        return None
    g = torch.Generator().manual_seed(args.seed)
    return torch.randn(shape, generator=g)

"""What a result was asked: every argument of `fnattr.attribute` that changes its numbers, saved in
`meta["request"]` (JSON), so that a reloaded result says what it explains and can be rebuilt.

`record` writes it: texts (sources, forced targets or the generation settings), chat and system
text, contrast texts and the contrast's token ids, target function and its options, the method
and its options (seeds and the baseline included; `meta["baseline"]` says which baseline that
meant), and the model: its name, hub revision or GGUF file's sha256, class and dtype. The library
versions are in `meta["versions"]`. `rerun(model, tokenizer, out)` calls `attribute` again from
`meta["request"]` alone; `describe` prints it (`fnattr show FILE`).

>>> out = fnattr.attribute(model, tok, "The capital of France is", " Paris",
...                        target_fn="contrast_prob_diff", contrast_targets=" Lyon")
>>> json.loads(out.meta["request"])["contrast_targets"]   # [' Lyon']
>>> fnattr.api.rerun(model, tok, fnattr.result.load("out.safetensors"))   # the same tensors
"""

import json
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from fnattr.result import AttributionTensors
from fnattr.types import Model

# `attribute`'s keywords recorded as given (texts, chat, generation, contrast, prepare options)
KEYWORDS = ("targets", "target_args", "max_new_tokens", "chat", "system", "keep_template",
            "generate_kwargs", "contrast_targets", "contrast_sources", "contrast_targets_alignments",
            "contrast_force_inputs", "contrast_context", "groups", "skip_special_tokens",
            "include_eos_baseline",
            "generate_from_target_prefix")


def model_identity(model: Model) -> dict[str, Any]:
    """Name (hub id, folder or GGUF file), hub revision, GGUF sha256, class and dtype of `model`."""
    config = model.config
    return {"name": str(getattr(config, "name_or_path", "") or ""),
            "revision": getattr(config, "_commit_hash", None),
            "gguf_sha256": getattr(config, "fnattr_gguf_sha256", None),
            "class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def _plain(value: Any, where: str) -> Any:
    """`value` as JSON; a tensor or function that JSON cannot hold is named, not kept."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, Tensor):
        return {"tensor": list(value.shape), "not_recorded": where}
    return {"object": getattr(value, "__name__", type(value).__name__), "not_recorded": where}


def record(out: AttributionTensors, *, model: Model, sources: Any, method: Any, target_fn: Any,
           method_args: Mapping[str, Any], contrast: Any = None, **keywords: Any) -> AttributionTensors:
    """`out` with `meta["request"]`: what `attribute` was asked (module docstring)."""
    req = {"sources": [sources] if isinstance(sources, str) else list(sources),
           "method": method if isinstance(method, str) else getattr(method, "__name__", "method"),
           "target_fn": target_fn if isinstance(target_fn, str) else getattr(target_fn, "__name__", "target"),
           "method_args": _plain({k: v for k, v in method_args.items() if k != "progress"}, "method_args"),
           **{k: _plain(keywords.get(k), k) for k in KEYWORDS},
           "contrast_ids": None if contrast is None else contrast.ids.tolist(),
           "model": model_identity(model)}
    for key in ("targets", "contrast_targets", "contrast_sources"):
        if isinstance(req[key], str):
            req[key] = [req[key]]
    return out.replace(meta={**out.meta, "request": json.dumps(req)})


def _unrecorded(value: Any) -> bool:
    if isinstance(value, dict):
        return "not_recorded" in value or any(_unrecorded(v) for v in value.values())
    if isinstance(value, list):
        return any(_unrecorded(v) for v in value)
    return False


def arguments(out: AttributionTensors) -> dict[str, Any]:
    """`attribute`'s arguments (but the model and tokenizer) from `out.meta["request"]`."""
    if "request" not in out.meta:
        raise ValueError("this result has no meta['request']: it was not made by fnattr.attribute "
                         "or `fnattr attribute` (or by a version before they recorded it).")
    req = json.loads(out.meta["request"])
    if missing := [k for k in ("method_args", *KEYWORDS) if _unrecorded(req.get(k))]:
        raise ValueError(f"meta['request'] cannot rebuild the call: {', '.join(missing)} held a "
                         "tensor or a function, which JSON does not record.")
    if not isinstance(req["target_fn"], str) or req["target_fn"] == "target":
        raise ValueError("meta['request'] names no built-in target function: pass it yourself.")
    kwargs = {k: req[k] for k in KEYWORDS}
    if isinstance(kwargs["contrast_targets_alignments"], list):
        kwargs["contrast_targets_alignments"] = [
            [tuple(p) for p in row] if isinstance(row, list) else row
            for row in kwargs["contrast_targets_alignments"]]
    return {"sources": req["sources"], "method": req["method"], "target_fn": req["target_fn"],
            **kwargs, **req["method_args"]}


def describe(meta: Mapping[str, str]) -> str:
    """Lines for `fnattr show`: what the result was asked, and with which model and versions."""
    lines = []
    if "request" in meta:
        req = json.loads(meta["request"])
        model = req.pop("model", {})
        m = f"model: {model.get('name') or '?'} ({model.get('class')}, {model.get('dtype')})"
        if model.get("revision"):
            m += f", revision {model['revision']}"
        if model.get("gguf_sha256"):
            m += f", GGUF sha256 {model['gguf_sha256']}"
        lines.append(m)
        shown = {k: v for k, v in req.items() if v not in (None, False, {}, [])}
        lines += [f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in shown.items()]
    for key in ("baseline", "versions"):
        if key in meta:
            lines.append(f"{key}: {meta[key]}")
    return "\n".join(lines)


"""``reparam inspect``: what a checkpoint holds and what a conversion would keep, without converting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import read_checkpoint, short, variant_of
from .pruning import MULTI_HEADS, compare_with_published, derive_deploy_plan

#: State-dict entries that are buffers, not parameters: the running statistics of ``torch.nn.BatchNorm2d`` (the
#: only module with buffers in YOLOv9's blocks). ``convert`` counts parameters only (``model.parameters()``).
BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def describe(path: str | Path, *, cfg: str | None = None, nc: int | None = None,
             names: tuple[str, ...] | None = None, head: str | None = None) -> dict[str, Any]:
    """A JSON-able description of the checkpoint at ``path`` (with ``cfg``: of a bare state_dict, see
    :func:`reparam.converter.checkpoint.read_state_dict`).

    Keys: file, bytes, top_level (every top-level entry -> a typed summary of what it holds:
    :func:`reparam.converter.checkpoint.summarize`; ``epoch`` stays an int, ``best_fitness`` a list of floats, the
    training args (``opt``) a dict), model_class, package_prefix (``""`` official layout, ``"yolov9."`` a pip fork),
    variant, head, nc, names, stride (``None`` for a state_dict: measured at conversion), weights
    (``ema``/``model``/``state_dict``), dtype, tensors, elements (every number the state_dict holds) = parameters
    (trainable weights, what ``convert`` reports) + buffer_elements (BatchNorm running statistics and batch
    counters, :data:`BUFFER_NAMES`), layers (dual/deploy/dropped), globals, state_dict (its origin, or ``None``),
    conversion (what a conversion keeps of the head: the deploy head, the branch kept (``head``: TripleDDetect's
    ``fine``/``coarse``), the branches there are, the head inputs and sub-modules kept) and published
    (:func:`.pruning.compare_with_published`: where the derived deploy config differs from the published one, or
    ``None`` for a custom architecture).
    Raises the errors of :func:`read_checkpoint` and :func:`derive_deploy_plan`.
    """
    ckpt = read_checkpoint(path, cfg=cfg, nc=nc, names=names)
    plan = derive_deploy_plan(ckpt.cfg, head)
    published = compare_with_published(ckpt.cfg, plan)
    rule = MULTI_HEADS.get(plan.dual_head)
    n_layers = len(ckpt.cfg["backbone"]) + len(ckpt.cfg["head"])
    return {
        "file": str(path),
        "bytes": ckpt.file_bytes,
        "top_level": ckpt.top_level,
        "model_class": ckpt.model_class,
        "package_prefix": ckpt.package_prefix,
        "variant": variant_of(ckpt),
        "head": ckpt.head_name,
        "nc": ckpt.nc,
        "names": {str(k): v for k, v in ckpt.names.items()},
        "stride": ckpt.stride,
        "weights": ckpt.weights,
        "dtype": ckpt.dtype,
        "tensors": len(ckpt.state_dict),
        "elements": sum(t.numel() for t in ckpt.state_dict.values()),
        "parameters": sum(t.numel() for k, t in ckpt.state_dict.items() if k.rsplit(".", 1)[-1] not in BUFFER_NAMES),
        "buffer_elements": sum(t.numel() for k, t in ckpt.state_dict.items() if k.rsplit(".", 1)[-1] in BUFFER_NAMES),
        "layers": {
            "dual": n_layers,
            "deploy": len(plan.layer_map),
            "dropped": plan.dropped,
            "pruned": plan.pruned,
        },
        "globals": ckpt.globals,
        "state_dict": ckpt.origin,
        "conversion": {
            "deploy_head": plan.deploy_cfg["head"][-1][2] if plan.pruned else plan.dual_head,
            "branch": plan.branch,
            "branches": list(rule.branches) if rule else [],
            "head_inputs": plan.head_inputs,
            "head_modules": dict(plan.head_rename),
        },
        "published": published.to_dict() if published else None,
        "published_summary": published.summary() if published else None,
    }


def format_description(desc: dict[str, Any]) -> str:
    """Human-readable text of :func:`describe`'s result."""
    names = list(desc["names"].values())
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    lines = [
        f"{desc['file']} ({desc['bytes']:,} bytes)",
        f"  model        {desc['model_class']} {desc['variant']}, head {desc['head']}, "
        f"stride {desc['stride'] or 'measured at conversion'}",
        f"  classes      nc={desc['nc']}: {shown}",
        f"  weights      {desc['parameters']:,} parameters (what convert counts) + {desc['buffer_elements']:,} "
        f"BatchNorm statistics = {desc['elements']:,} numbers in {desc['tensors']} tensors, {desc['dtype']}, "
        f"using '{desc['weights']}'",
        f"  layers       {desc['layers']['dual']}; a conversion keeps {desc['layers']['deploy']}"
        + (f" and drops {len(desc['layers']['dropped'])} (auxiliary branch)" if desc["layers"]["pruned"]
           else " (no auxiliary branch: nothing to prune)"),
        "  entries      " + (", ".join(f"{k}={short(v)}" for k, v in desc["top_level"].items()) or "none"),
    ]
    conv = desc.get("conversion")
    if conv and desc["layers"]["pruned"]:
        kept = ", ".join(f"{k}<-{v}" for k, v in conv["head_modules"].items())
        others = [b for b in conv["branches"] if b != conv["branch"]]
        lines.insert(-1, f"  head         {desc['head']} -> {conv['deploy_head']} from the {conv['branch']} branch "
                         f"(inputs {conv['head_inputs']} of its from-list; {kept})"
                         + (f"; --head {'/'.join(others)} keeps the other" if others else ""))
    if desc.get("published_summary"):
        lines.insert(-1, f"  config       {desc['published_summary']}")
    if desc.get("package_prefix"):
        lines.insert(2, f"  package      official YOLOv9 classes under the prefix '{desc['package_prefix']}'")
    if desc.get("state_dict"):
        sd = desc["state_dict"]
        lines.append(f"  state_dict   {sd['entry']}, key prefix {sd['key_prefix'] or 'none'!r}, config {sd['config']}"
                     + "".join(f"; {n}" for n in sd["notes"]))
    return "\n".join(lines)

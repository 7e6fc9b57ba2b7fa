"""The equivalence check: the deploy model must give the dual model's main-branch output.

YOLOv9's ``DualDDetect`` in eval mode returns ``([y_aux, y_main], [d_aux, d_main])`` where each ``y`` is
``[B, 4 + nc, A]`` (box xywh in input pixels, then class sigmoid scores; ``A`` anchors, 8400 at 640x640) — the
main half (``cv4``/``cv5``/``dfl2``) is index 1. The deploy ``DDetect`` returns ``(y, d)`` with ``y`` of the same
shape. Both run in fp32 on the same seeded inputs; the largest absolute difference is reported in the units of
``y`` (pixels for boxes, probability for scores).

Segmentation (``DualDSegment`` -> ``DSegment``, YOLOv9 ``models/yolo.py``): the eval output is
``(cat(y, mc) [B, 4 + nc + nm, A], (maps, mc, p))`` with raw mask coefficients ``mc`` and the mask prototypes
``p [B, nm, H/4, W/4]``; boxes, scores, mask coefficients and prototypes are each compared (every comparison's
``parts``), and all must be within ``atol``. ``TripleDDetect`` (yolov9-cf): the deploy model is compared with the
branch the conversion kept (``fine``, the one the official eval forward returns, or ``coarse``, evaluated on the
inputs the head received in the same forward).

Two check levels (:func:`check_conversion`):

* ``fast`` (default): the deploy model against the dual model's main branch on one full-size ``[1, 3, s, s]`` input,
  where the dual model runs only the layers its main branch depends on (:func:`main_branch_forward`: the auxiliary
  branch cannot influence the main output, so running it would prove nothing more), in lockstep with the deploy
  model (:func:`lockstep_forward`, below); then, on a small non-square batch ``[2, 3, h, w]`` (``h = 64``, ``w =
  96`` at stride 32: every level's map is non-square, 8x12, 4x6 and 2x3: shape handling, batching and rectangular
  anchors), the *whole* dual model (both branches), the whole deploy model and the lockstep of both, which must all
  agree. That second step also proves,
  on every conversion, that the main-only evaluation equals the full dual forward and that the lockstep's deploy
  output equals the deploy model's own forward. The FLOP count is taken during the small step and scaled to ``s x
  s``.
* ``full``: the whole dual model and the deploy model on the full-size input and on a non-square batch of 2 at
  half and three quarters of the size (what reparam did before ``fast`` existed).

Lockstep: why a deploy layer that is not recomputed is still proven. A YOLOv9 layer is a function of its inputs
alone, fixed by its class, its constructor arguments and hyperparameters (every public attribute of every module in
it) and its parameters and buffers; routing (``f``) only says which activations it receives. At full size a deploy
layer is not run when (a) a dual layer of the same class computes the same function: every module of both trees has
the same class, train/eval flag, ``extra_repr()`` and public attributes (:func:`same_function`), (b) every parameter
and buffer is identical (:func:`identical_tensors`: same dtype and shape, equal values; normally literally the same
storage, since the deploy model holds the checkpoint's own tensors), and (c) its inputs are the very tensor objects
that dual layer received (each deploy activation is either computed or is a dual activation object, and the table
records which dual layer produced it). Same function, same arguments, same inputs: the output is the dual layer's
output, so the deploy side takes that object instead of computing it again (with deterministic kernels the bits
would be the same; the point is not the bits but that nothing of the conversion can differ there). Anything not
identical runs and flows on, so a layer map that names the wrong dual layer, a rewired input, a missing or shortened
block or a leaked auxiliary tensor makes the deploy side compute, and its difference reaches the head. The head
(``DualDDetect`` vs ``DDetect``, ``DualDSegment`` vs ``DSegment``, ``TripleDDetect``) always runs on the deploy side
on its own inputs, and is compared. The candidates are found from the dual graph itself (which dual layer reads
exactly those activations), not from the conversion's layer map, so the check stays independent of the conversion
under test. The report counts, per comparison, the deploy layers shared and run (``layers_shared``/``layers_run``).
The small non-square step runs the whole deploy model for real, so the deploy model's own forward (routing, shapes,
batching) still executes end to end on every conversion.

Weights stay in their saved dtype (fp16) and are upcast one module at a time while it runs
(:func:`computing_in_fp32`): exact, and the fp32 copy of the model is never held in memory at once.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .. import report as report_mod
from ..report import Comparison
from ..spec import DEFAULT_ATOL
from .pruning import ancestors, head_rule, resolve_from

#: Check levels of :func:`check_conversion` (``--check``), the default first.
CHECK_LEVELS = ("fast", "full")
#: Shorter side of the small non-square batch of the ``fast`` level, in pixels (rounded up to the largest stride):
#: two strides at stride 32, so the longer side (1.5x) is three and every level's map stays non-square (2x3 at P5).
#: Nothing about shape handling needs more pixels, and each pixel of it costs three forward passes.
SMALL_SIDE = 64


@dataclass
class ValidationResult:
    """Outcome of :func:`check_conversion`.

    ``max_abs_diff`` is the largest |deploy - dual main| over all inputs (fp32); ``passed`` is
    ``max_abs_diff <= atol`` with matching shapes and finite outputs.
    """

    passed: bool
    max_abs_diff: float
    atol: float
    #: one per input compared (:class:`reparam.report.Comparison`, the report's own type)
    comparisons: list[Comparison] = field(default_factory=list)
    reason: str = ""
    #: the check level that ran (:data:`CHECK_LEVELS`)
    check: str = "full"
    #: ``fast`` only: max |main-only evaluation - full dual forward| on the small batch (must be <= atol)
    main_only_vs_full: float | None = None

    def to_report(self, *, imgsz: int, seed: int,
                  devices: list[report_mod.DeviceCheck] | None) -> report_mod.Validation:
        """The report's ``validation`` section: this result, the image size and seed of its inputs, and the check per
        device (``--device`` first, then ``--check-device``)."""
        return report_mod.Validation(passed=self.passed, max_abs_diff=self.max_abs_diff, atol=self.atol,
                                     comparisons=list(self.comparisons), reason=self.reason, check=self.check,
                                     main_only_vs_full=self.main_only_vs_full, imgsz=imgsz, seed=seed,
                                     devices=devices)


def main_output(out: Any) -> torch.Tensor:
    """The decoded main-branch prediction ``[B, 4 + nc, A]`` of a YOLOv9 head's eval output.

    Handles ``DDetect`` (``(y, d)``) and ``DualDDetect`` (``([y_aux, y_main], [d_aux, d_main])``), and export mode
    (a bare tensor or list). For segmentation heads it is ``[B, 4 + nc + nm, A]`` (mask coefficients last). Raises
    ``ValueError`` for anything else.
    """
    y = out[0] if isinstance(out, tuple) else out
    if isinstance(y, (list, tuple)):
        y = y[-1]
    if not isinstance(y, torch.Tensor) or y.dim() != 3:
        raise ValueError(f"unexpected head output {type(y).__name__}")
    return y


@dataclass
class HeadOutput:
    """A head's eval output, unpacked (:func:`unpack_output`).

    Attributes:
        y: ``[B, 4 + nc (+ nm), A]``: boxes (xywh, input pixels), class scores, and for segmentation the raw mask
            coefficients.
        maps: the raw per-level maps ``[B, 64 + nc, H_i, W_i]`` of that branch.
        prototypes: segmentation only: the mask prototypes ``[B, nm, H_p, W_p]``; None for detection.
    """

    y: torch.Tensor
    maps: list[torch.Tensor]
    prototypes: torch.Tensor | None = None


def unpack_output(out: Any) -> HeadOutput:
    """Unpack the eval output of any supported head into :class:`HeadOutput` (the main branch of a dual head).

    ``DDetect``/``TripleDDetect``: ``(y, maps)``; ``DualDDetect``: ``([y_aux, y_main], [maps_aux, maps_main])``;
    ``DSegment``/``DualDSegment``: ``(cat(y, mc), (maps, mc, p))`` (YOLOv9 ``models/yolo.py``). Raises ``ValueError``
    for anything else.
    """
    y = main_output(out)
    rest = out[1] if isinstance(out, tuple) and len(out) > 1 else None
    protos = None
    if isinstance(rest, tuple) and len(rest) == 3 and isinstance(rest[2], torch.Tensor):  # (maps, mc, p)
        rest, protos = rest[0], rest[2]
    if isinstance(rest, (list, tuple)) and rest and isinstance(rest[0], (list, tuple)):  # [maps_aux, maps_main]
        rest = rest[-1]
    if not isinstance(rest, (list, tuple)) or not all(isinstance(m, torch.Tensor) for m in rest):
        raise ValueError("cannot read the feature maps of the head's output")
    return HeadOutput(y, list(rest), protos)


def output_parts(out: HeadOutput, nc: int) -> dict[str, torch.Tensor]:
    """The parts compared one by one: ``boxes [B, 4, A]``, ``scores [B, nc, A]`` and, for segmentation,
    ``mask_coefficients [B, nm, A]`` and ``prototypes [B, nm, H_p, W_p]``."""
    parts = {"boxes": out.y[:, :4], "scores": out.y[:, 4:4 + nc]}
    if out.prototypes is not None:
        parts["mask_coefficients"] = out.y[:, 4 + nc:]
        parts["prototypes"] = out.prototypes
    return parts


def _branch_of(head: nn.Module, branch: str | None):
    """``(rule, chosen branch)`` of a multi-branch head (:func:`.pruning.head_rule`), None for a deploy head."""
    if not hasattr(head, "forward_branch"):
        return None
    return head_rule(type(head).__name__, branch)


def aligned_size(size: int, stride: int) -> int:
    """``size`` rounded up to a multiple of ``stride`` (YOLO inputs must be stride-aligned)."""
    return max(stride, -(-int(size) // stride) * stride)


def sample_inputs(imgsz: int, stride: int, seed: int = 0) -> list[torch.Tensor]:
    """Seeded inputs in [0, 1): one ``[1, 3, s, s]`` at ``s = aligned(imgsz)`` and one non-square ``[2, 3, h, w]``.

    The second exercises batching and anchor generation for a rectangular shape.
    """
    g = torch.Generator().manual_seed(seed)
    s = aligned_size(imgsz, stride)
    h, w = aligned_size(s // 2, stride), aligned_size(s * 3 // 4, stride)
    return [torch.rand(1, 3, s, s, generator=g), torch.rand(2, 3, h, w, generator=g)]


def fast_inputs(imgsz: int, stride: int, seed: int = 0) -> list[torch.Tensor]:
    """Seeded inputs in [0, 1) of the ``fast`` level: ``[1, 3, s, s]`` and a small non-square ``[2, 3, h, w]``.

    ``s = aligned(imgsz)`` (the first input equals :func:`sample_inputs`' first), ``h = aligned(min(s, SMALL_SIDE))``
    and ``w = aligned(1.5 h)`` (64 x 96 at stride 32): every size a multiple of ``stride``.
    """
    g = torch.Generator().manual_seed(seed)
    s = aligned_size(imgsz, stride)
    h = aligned_size(min(s, SMALL_SIDE), stride)
    w = aligned_size(h * 3 // 2, stride)
    return [torch.rand(1, 3, s, s, generator=g), torch.rand(2, 3, h, w, generator=g)]


def _own_tensors(module: nn.Module) -> list[tuple[dict, str]]:
    return [(group, name) for group in (module._parameters, module._buffers)
            for name, t in group.items() if t is not None and t.is_floating_point() and t.dtype != torch.float32]


@contextmanager
def computing_in_fp32(*models: nn.Module) -> Iterator[None]:
    """Within the block, ``models`` compute in fp32 while their weights stay stored as saved (e.g. fp16).

    Each module's own floating parameters and buffers are replaced by fp32 copies just before it runs and put back
    right after, so at most one module's fp32 copy exists at a time (peak memory: the saved weights plus one
    layer). fp16 -> fp32 is exact, so the outputs equal those of ``model.float()``. Inputs must be fp32. Models
    already in fp32 are left alone. Everything is restored on exit, also after an exception.
    """
    handles = []
    stash: dict[int, list[tuple[dict, str, torch.Tensor]]] = {}

    def before(module: nn.Module, _args: Any) -> None:
        saved = stash.setdefault(id(module), [])
        for group, name in _own_tensors(module):
            saved.append((group, name, group[name]))
            group[name] = group[name].float()

    def after(module: nn.Module, _args: Any, _out: Any) -> None:
        for group, name, t in reversed(stash.pop(id(module), [])):
            group[name] = t

    try:
        for model in models:
            for m in model.modules():
                if _own_tensors(m):
                    handles.append(m.register_forward_pre_hook(before))
                    handles.append(m.register_forward_hook(after))
        yield
    finally:
        for h in handles:
            h.remove()
        for saved in stash.values():
            for group, name, t in reversed(saved):
                group[name] = t
        stash.clear()


@contextmanager
def strict_fp32() -> Iterator[None]:
    """Within the block, CUDA convolutions and matmuls compute in true fp32 (TF32 off), as on the CPU.

    TF32 (on by default for cuDNN convolutions on Ampere and newer GPUs) keeps 10 mantissa bits and would make the
    equivalence check measure the GPU's rounding instead of the conversion. No effect on the CPU. The previous
    settings are restored on exit.
    """
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def main_branch_forward(model: nn.Module, x: torch.Tensor, branch: str | None = None) -> Any:
    """The kept branch's eval output of a multi-branch model, running only the layers that branch depends on.

    Layers are routed exactly as YOLOv9's ``_forward_once`` (each layer reads ``from``: ``-1`` the previous layer,
    the image at layer 0), but a layer runs only when the head branch's inputs depend on it (for a dual head its
    main inputs, :func:`.pruning.head_rule`; ``branch`` picks TripleDDetect's ``fine``/``coarse``), and each output
    is dropped after its last reader. The head runs that branch alone (``forward_branch``). The dependencies are
    read from the built model itself (each layer's ``f``), not from the deploy plan, so this is an evaluation of
    the dual graph, independent of the conversion under test. A model without a multi-branch head runs its plain
    forward.

    Returns the head's eval output for that branch: ``(y, maps)``, or for segmentation ``(cat(y, mc), (maps, mc,
    p))`` (read it with :func:`unpack_output`).
    """
    # the ignores on `model.model` below: a YOLOv9 model (its layers in .model); nn.Module declares no .model
    layers = list(model.model)  # type: ignore[attr-defined]
    head = layers[-1]
    found = _branch_of(head, branch)
    if found is None:
        return model(x)
    rule, chosen = found
    sources = {m.i: resolve_from(m.f, m.i) for m in layers}
    head_in = sources[head.i]
    main_in = [head_in[p] for p in rule.positions(len(head_in), chosen)]
    needed = ancestors(sources, main_in)
    last_read: dict[int, int] = {}
    for i in sorted(needed) + [head.i]:
        for j in (sources[i] if i != head.i else main_in):
            last_read[j] = i
    outputs: dict[int, torch.Tensor] = {-1: x}
    for m in layers[:-1]:
        if m.i not in needed:
            continue
        ins = [outputs[j] for j in sources[m.i]]
        outputs[m.i] = m(ins[0] if isinstance(m.f, int) else ins)
        for j in set(sources[m.i]):
            if last_read.get(j) == m.i:
                del outputs[j]
    return head.forward_branch([outputs[j] for j in main_in], chosen.group)


#: Attributes of a layer that route it (``i``, its index; ``f``, where it reads from): not part of the function it
#: computes. Where its inputs come from is checked separately (the lockstep provenance of each input).
_ROUTING = frozenset({"i", "f"})
_PLAIN = (int, float, str, bool, type(None), torch.Size, torch.dtype)


def _has_nan(t: torch.Tensor) -> bool:
    """True when the float tensor ``t`` holds a NaN: ``torch.aminmax`` propagates NaN (torch docs), one vectorized
    pass without the boolean copy of ``isnan(t).any()``."""
    if t.numel() == 0:
        return False
    lo, hi = torch.aminmax(t)
    return bool(torch.isnan(lo)) or bool(torch.isnan(hi))


def identical_tensors(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` hold the same values: same dtype, shape, device and layout, and either the very same
    memory (storage, offset and strides) or equal elements (``torch.equal``).

    For floats, equal elements are bitwise identical except that ``-0.0`` equals ``+0.0`` (the only two bit patterns
    that compare equal; the transfer turns one into the other, :func:`.transfer.canonical_zeros`), and a NaN never
    equals anything, so tensors holding one never count as identical. A weight that is ``-0.0`` on one side and
    ``+0.0`` on the other gives products that are zeros either way, and adding a zero of either sign to a sum gives
    the same value (IEEE 754), so such layers compute equal values (at most an exact zero's sign differs, which no
    YOLOv9 operation turns into another value: none divides by an activation).
    """
    if (a.dtype, a.shape, a.device, a.layout) != (b.dtype, b.shape, b.device, b.layout):
        return False
    if (a.data_ptr(), a.storage_offset(), a.stride()) == (b.data_ptr(), b.storage_offset(), b.stride()) \
            and not (a.is_floating_point() and _has_nan(a)):
        return True
    return bool(torch.equal(a, b))


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and identical_tensors(a, b)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)  # type: ignore[arg-type]
                and all(_same_value(x, y) for x, y in zip(a, b)))  # type: ignore[call-overload]
    if isinstance(a, _PLAIN) and isinstance(b, _PLAIN):
        return type(a) is type(b) and a == b
    return a is b  # anything else (a bound method set on the instance, a module ...) only when it is the same object


def same_function(a: nn.Module, b: nn.Module) -> bool:
    """True when layers ``a`` and ``b`` compute the same function: given the same inputs, the same output.

    Compared over both module trees, module by module (same names in the same order): the class, the train/eval
    flag, every public instance attribute (the constructor arguments and hyperparameters, e.g. a conv's
    ``kernel_size``/``stride``/``groups``, a BatchNorm's ``eps``, ``c`` of a RepNCSPELAN4, ``idx`` of a CBFuse; the
    top layer's routing ``i``/``f`` excepted), ``extra_repr()``, and every parameter and buffer
    (:func:`identical_tensors`). An attribute of any other kind (a method bound on the instance, say) must be the
    same object. Anything not identical counts as different: the layer then runs (:func:`lockstep_forward`).
    """
    ma, mb = list(a.named_modules()), list(b.named_modules())
    if len(ma) != len(mb):
        return False
    for (na, x), (nb, y) in zip(ma, mb):
        if na != nb or type(x) is not type(y) or x.training != y.training or x.extra_repr() != y.extra_repr():
            return False
        skip = _ROUTING if x is a else frozenset()
        va = {k: v for k, v in vars(x).items() if not k.startswith("_") and k not in skip}
        vb = {k: v for k, v in vars(y).items() if not k.startswith("_") and k not in skip}
        if va.keys() != vb.keys() or not all(_same_value(va[k], vb[k]) for k in va):
            return False
        for group in ("_parameters", "_buffers"):
            ta, tb = getattr(x, group), getattr(y, group)
            if ta.keys() != tb.keys() or not all(_same_value(ta[k], tb[k]) for k in ta):
                return False
    return True


@dataclass
class Lockstep:
    """What :func:`lockstep_forward` did with the deploy model's layers.

    Attributes:
        shared: deploy layers whose output *is* the dual model's output of the same function on the same inputs
            (not recomputed); ran: deploy layers that ran (the head always does).
        ran_layers: the indices of the deploy layers that ran.
    """

    shared: int
    ran: int
    ran_layers: list[int] = field(default_factory=list)


def _routing(layers: list[nn.Module]) -> dict[int, list[int]]:
    return {m.i: resolve_from(m.f, m.i) for m in layers}


def _last_reads(sources: dict[int, list[int]], order: list[int]) -> dict[int, int]:
    """For each activation (layer index, ``-1`` the image), the last layer in ``order`` that reads it."""
    last: dict[int, int] = {}
    for i in order:
        for j in sources[i]:
            last[j] = i
    return last


def lockstep_forward(dual: nn.Module, deploy: nn.Module, x: torch.Tensor,
                     branch: str | None = None,
                     verdicts: dict[tuple[int, int], bool] | None = None) -> tuple[Any, Any, Lockstep]:
    """The dual model's kept branch and the deploy model on the same input ``x`` ``[B, 3, H, W]``, layer by layer,
    computing each structurally identical layer once.

    The dual model runs exactly as :func:`main_branch_forward` (only the layers its kept branch depends on, each
    output dropped after its last reader). The deploy layers are taken in order: a deploy layer whose every input is
    a dual activation (it reads the very tensors the dual layers produced: each deploy activation is either a fresh
    result or the dual activation object itself, and which dual layer made it is recorded) and for which a dual
    layer exists that reads exactly those activations, in the same call form (one tensor or a list), and computes
    the same function (:func:`same_function`) gets that dual layer's output object instead of running; every other
    deploy layer runs on its inputs. The deploy head always runs, on its own inputs. Each deploy output is dropped
    after its last reader too; a shared output lives as long as either side still reads it.

    ``verdicts``, when given, keeps each :func:`same_function` answer by ``(dual layer, deploy layer)`` index, so a
    second lockstep of the same two models (another input) does not compare their modules and tensors again; pass
    the same dict only for the same, unchanged models.

    Returns ``(dual_out, deploy_out, lockstep)``: the dual head's kept-branch eval output (as
    :func:`main_branch_forward`), the deploy head's eval output (as ``deploy(x)``) and :class:`Lockstep`.
    """
    known = verdicts if verdicts is not None else {}
    d_layers, p_layers = list(dual.model), list(deploy.model)  # type: ignore[attr-defined]
    d_head, p_head = d_layers[-1], p_layers[-1]
    d_src, p_src = _routing(d_layers), _routing(p_layers)
    found = _branch_of(d_head, branch)
    d_head_in = d_src[d_head.i]
    main_in = d_head_in if found is None else [d_head_in[p] for p in found[0].positions(len(d_head_in), found[1])]
    needed = sorted(ancestors(d_src, main_in))
    d_src[d_head.i] = main_in
    d_last = _last_reads(d_src, needed + [d_head.i])
    p_last = _last_reads(p_src, [m.i for m in p_layers])
    by_inputs: dict[tuple[int, ...], list[int]] = {}
    for i in needed:
        by_inputs.setdefault(tuple(d_src[i]), []).append(i)

    d_out: dict[int, Any] = {-1: x}
    p_out: dict[int, Any] = {-1: x}
    made_by: dict[int, int] = {-1: -1}  # deploy activation -> the dual layer whose output object it is
    pending = iter(needed)
    done = -1  # the last dual layer computed

    def call(m: nn.Module, ins: list[Any]) -> Any:
        return m(ins[0] if isinstance(m.f, int) else ins)

    def advance(upto: int) -> None:
        nonlocal done
        while done < upto:
            i = next(pending, None)
            if i is None:
                done = upto
                return
            d_out[i] = call(d_layers[i], [d_out[j] for j in d_src[i]])
            for j in set(d_src[i]):
                if d_last.get(j) == i:
                    del d_out[j]
            done = i

    def drop_read(out: dict[int, Any], src: list[int], last: dict[int, int], i: int) -> None:
        for j in set(src):
            if last.get(j) == i:
                del out[j]

    ran: list[int] = []
    for m in p_layers[:-1]:
        src = p_src[m.i]
        key = tuple(made_by.get(j, -2) for j in src)
        twin = None
        if -2 not in key:
            for c in by_inputs.get(key, []):
                if c > done or c in d_out:  # not computed yet, or still held
                    dm = d_layers[c]
                    if (c, m.i) not in known:
                        known[(c, m.i)] = isinstance(dm.f, int) == isinstance(m.f, int) and same_function(dm, m)
                    if known[(c, m.i)]:
                        twin = c
                        break
        if twin is not None:
            advance(twin)
            p_out[m.i] = d_out[twin]
            made_by[m.i] = twin
        else:
            p_out[m.i] = call(m, [p_out[j] for j in src])
            ran.append(m.i)
        drop_read(p_out, src, p_last, m.i)
    advance(needed[-1] if needed else -1)
    ins = [d_out[j] for j in main_in]
    d_result = d_head(ins) if found is None else d_head.forward_branch(ins, found[1].group)
    del ins
    d_out.clear()
    p_result = call(p_head, [p_out[j] for j in p_src[p_head.i]])
    ran.append(p_head.i)
    return d_result, p_result, Lockstep(shared=len(p_layers) - len(ran), ran=len(ran), ran_layers=ran)


@contextmanager
def capturing_head_inputs(model: nn.Module) -> Iterator[list[Any]]:
    """Within the block, every input list the model's head receives is appended to the yielded list."""
    seen: list[Any] = []
    handle = model.model[-1].register_forward_pre_hook(  # type: ignore[attr-defined,index]
        lambda _m, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def select_branch(model: nn.Module, out: Any, head_inputs: list[torch.Tensor] | None, branch: str | None) -> Any:
    """The kept branch's eval output, from a whole-model forward's output ``out`` and the inputs its head received.

    When the kept branch is the one the head's own eval ``forward`` returns (the main branch of a dual head,
    TripleDDetect's ``fine``; :attr:`.pruning.HeadRule.official_eval_branch`) ``out`` is returned as is. Otherwise
    (TripleDDetect's ``coarse``) that branch is evaluated on ``head_inputs`` (``forward_branch``).
    """
    head = model.model[-1]  # type: ignore[attr-defined,index]
    found = _branch_of(head, branch)
    if found is None or found[1].group == found[0].official_eval_branch:
        return out
    rule, chosen = found
    if head_inputs is None:
        raise ValueError("the head's inputs were not captured")
    return head.forward_branch([head_inputs[p] for p in rule.positions(len(head_inputs), chosen)], chosen.group)


def branch_forward(model: nn.Module, x: torch.Tensor, branch: str | None = None) -> Any:
    """The whole model's forward (every branch runs), returned as the kept branch's eval output
    (:func:`select_branch`)."""
    with capturing_head_inputs(model) as seen:
        out = model(x)
    return select_branch(model, out, seen[-1] if seen else None, branch)


def _compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, str]:
    """max |a - b| and a reason when the outputs cannot be compared (shapes) or are not finite."""
    if a.shape != b.shape:
        return float("inf"), f"output shapes differ: dual main {list(a.shape)} vs deploy {list(b.shape)}"
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf"), "non-finite values in the outputs"
    return (float((a - b).abs().max()) if a.numel() else 0.0), ""


def _compare_outputs(dual: HeadOutput, deploy: HeadOutput, nc: int, parts: dict[str, float]) -> tuple[float, str]:
    """max |dual - deploy| over every part of the output (:func:`output_parts`), each part's max filled into
    ``parts``; a reason when the parts differ in kind or shape or are not finite."""
    a, b = output_parts(dual, nc), output_parts(deploy, nc)
    if set(a) != set(b):
        return float("inf"), f"output parts differ: dual main {sorted(a)} vs deploy {sorted(b)}"
    worst, reasons = 0.0, []
    for name in a:
        d, why = _compare(a[name].float(), b[name].float())
        parts[name] = d
        worst = max(worst, d)
        if why:
            reasons.append(f"{name}: {why}")
    return worst, "; ".join(reasons)


def _stride_mismatch(x: torch.Tensor, out: Any, *models: nn.Module) -> str:
    """A reason when the models' head strides differ from those of the feature maps ``out`` holds (else "").

    ``out`` is a head's eval output (:func:`unpack_output`). The stride of level ``i`` is ``H / H_i`` (YOLOv9
    measures it the same way, on a blank 256 px image).
    """
    try:
        maps = unpack_output(out).maps
    except ValueError:
        maps = []
    if not maps:
        return "cannot read the feature maps of the dual model's head"
    measured = [x.shape[-2] / m.shape[-2] for m in maps]
    for model in models:
        used = [float(v) for v in model.model[-1].stride]  # type: ignore[attr-defined,index]
        if used != measured:
            return f"the head strides {used} do not match the feature maps (strides {measured})"
    return ""


@contextmanager
def models_on(device: torch.device | str | None, *models: nn.Module) -> Iterator[None]:
    """Within the block, ``models`` live on ``device`` (weights keep their dtype); on exit they hold their own CPU
    tensors again.

    ``None`` or the CPU leaves them where they are (no copy). Otherwise every tensor the modules hold (each
    parameter's data, each buffer, and the plain tensor attributes a model's ``_apply`` moves too, such as a head's
    ``stride``) is kept before the move and put back after (also after an exception), instead of copying the
    device's tensors back: the models leave the block holding the very tensors they came with (the checkpoint's own
    storage, which the artifacts are written from), and no second copy of the weights exists on the CPU.
    """
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type == "cpu":
        yield
        return
    # a move may set a parameter's .data or replace the Parameter object (torch's Module._apply): keep both
    params = [(p, p.data) for m in models for p in m.parameters()]
    held = [(mod, dict(mod._parameters), dict(mod._buffers),
             {k: v for k, v in vars(mod).items() if isinstance(v, torch.Tensor)})
            for m in models for mod in m.modules()]
    try:
        for m in models:
            m.to(dev)
        yield
    finally:
        for p, data in params:
            p.data = data
        for mod, parameters, buffers, attrs in held:
            mod._parameters.update(parameters)
            mod._buffers.update(buffers)
            mod.__dict__.update(attrs)


def check_conversion(
    dual: nn.Module, deploy: nn.Module, *, imgsz: int, stride: int, seed: int = 0, atol: float = DEFAULT_ATOL,
    level: str = "fast", branch: str | None = None, device: torch.device | str | None = None,
) -> tuple[ValidationResult, dict[str, float]]:
    """Prove that ``deploy`` computes the dual model's main branch; count both models' GFLOPs on the way.

    Args:
        dual: the dual model (its head returns both halves); ``deploy``: the pruned model. Weights in any float
            dtype (computed in fp32 via :func:`computing_in_fp32`), eval mode.
        imgsz: full-size side in pixels (rounded up to ``stride``); stride: the largest head stride (pixels).
        seed: seed of the inputs; atol: tolerance on every max |diff| (output units: pixels / probability).
        level: ``"fast"`` or ``"full"`` (see the module docstring).
        branch: the dual head's branch the deploy model was made from (TripleDDetect: ``"fine"``/``"coarse"``;
            None: the head's default, :func:`.pruning.head_rule`).
        device: where both models and the inputs compute (``None``/CPU: where they are; CUDA: moved there for the
            check and back to the CPU after, :func:`models_on`). The inputs are drawn on the CPU with the seed and
            then moved, so every device sees the same numbers; the computation stays fp32 on every device (no TF32:
            :func:`strict_fp32`).

    Returns:
        ``(result, gflops)``: ``gflops = {"before": dual, "after": deploy, "imgsz": s}``, GFLOPs of one
        ``[1, 3, s, s]`` forward, counted during the non-square check (:func:`counting_conv_flops`) and scaled by
        area (:func:`scaled_gflops`). The head strides both models decode with must equal those of the dual
        model's feature maps on that check (models built with a checkpoint's stored strides are checked here).

    Raises ValueError for an unknown level.
    """
    if level not in CHECK_LEVELS:
        raise ValueError(f"unknown check level {level!r}; choose from {', '.join(CHECK_LEVELS)}")
    dual.eval()
    deploy.eval()
    inputs = fast_inputs(imgsz, stride, seed) if level == "fast" else sample_inputs(imgsz, stride, seed)
    if device is not None:
        inputs = [x.to(device) for x in inputs]
    s = int(inputs[0].shape[-1])
    comps: list[Comparison] = []
    reasons: list[str] = []
    worst = 0.0
    main_only_vs_full = None
    flops: dict[str, float] = {}

    nc = int(getattr(deploy.model[-1], "nc", 0))  # type: ignore[attr-defined,index]

    def record(x: torch.Tensor, a: Any, b: Any, how: str, steps: Lockstep | None = None) -> None:
        nonlocal worst
        ours, theirs = unpack_output(b), unpack_output(a)
        parts: dict[str, float] = {}
        d, why = _compare_outputs(theirs, ours, nc, parts)
        if why:
            reasons.append(why)
        worst = max(worst, d)
        comps.append(Comparison(list(x.shape), list(ours.y.shape), d, how, parts,
                                layers_shared=steps.shared if steps else None,
                                layers_run=steps.ran if steps else None))

    verdicts: dict[tuple[int, int], bool] = {}  # same_function answers, shared by both locksteps (same models)
    with models_on(device, dual, deploy), strict_fp32(), computing_in_fp32(dual, deploy), torch.inference_mode():
        big, small = inputs
        if level == "fast":
            theirs, ours, steps = lockstep_forward(dual, deploy, big, branch, verdicts)
            record(big, theirs, ours, "main-only", steps)
            del theirs, ours
        else:
            record(big, branch_forward(dual, big, branch), deploy(big), "full")
        with counting_conv_flops(dual) as counter, capturing_head_inputs(dual) as seen:
            raw = dual(small)
        out = select_branch(dual, raw, seen[-1] if seen else None, branch)
        why = _stride_mismatch(small, out, dual, deploy)
        if why:
            reasons.append(why)
        flops["before"] = scaled_gflops(counter["flops"], small.shape, s)
        with counting_conv_flops(deploy) as counter:
            b = deploy(small)
        flops["after"] = scaled_gflops(counter["flops"], small.shape, s)
        record(small, out, b, "full")
        if level == "fast":  # the lockstep itself, checked on the small batch against both whole forwards
            theirs, ours, _steps = lockstep_forward(dual, deploy, small, branch, verdicts)
            d, why = _compare_outputs(unpack_output(out), unpack_output(theirs), nc, {})
            main_only_vs_full = d
            if why or d > atol:
                reasons.append(f"the main-only evaluation of the dual model differs from its full forward "
                               f"({why or f'max |diff| {d:.3g}'})")
            d, why = _compare_outputs(unpack_output(b), unpack_output(ours), nc, {})
            if why or d > atol:
                reasons.append(f"the lockstep deploy output differs from the deploy model's own forward "
                               f"({why or f'max |diff| {d:.3g}'})")
    passed = not reasons and worst <= atol
    reason = "; ".join(reasons)
    if not passed and not reason:
        reason = f"max |diff| {worst:.3g} exceeds atol {atol:.3g}"
    result = ValidationResult(passed=passed, max_abs_diff=worst, atol=atol, comparisons=comps, reason=reason,
                              check=level, main_only_vs_full=main_only_vs_full)
    return result, {**flops, "imgsz": s}


def count_params(model: nn.Module) -> int:
    """Number of parameters (elements), buffers excluded."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def counting_conv_flops(model: nn.Module) -> Iterator[dict[str, int]]:
    """Count the FLOPs of every ``nn.Conv2d`` of ``model`` run inside the block into ``counter["flops"]``.

    ``2 x out.numel() x (C_in / groups) x k_h x k_w`` per call: the rule of ``torch.utils.flop_counter`` for
    convolutions (2 x multiply-accumulates, bias not counted). YOLOv9 graphs compute with convolutions only (their
    other ops, activations, pooling, upsampling, concatenation, are not counted by that rule either), so this
    equals ``FlopCounterMode``'s total, without its per-op Python dispatch, which is slow and, on the first
    ``.float()`` it sees, imports torch's decompositions (seconds).
    """
    counter = {"flops": 0}

    def count(m: nn.Module, _args: Any, out: torch.Tensor) -> None:
        counter["flops"] += 2 * out.numel() * m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        yield counter
    finally:
        for h in handles:
            h.remove()


def scaled_gflops(flops: int, shape: torch.Size | tuple[int, ...], imgsz: int) -> float:
    """GFLOPs of one ``[1, 3, imgsz, imgsz]`` forward, from ``flops`` counted on an input of ``shape [B, 3, h, w]``.

    Counted as ``torch.utils.flop_counter`` does (:func:`counting_conv_flops`): 2 x multiply-accumulates for
    convolutions (the official YOLOv9 printout uses thop's MACs x 2 too, so numbers are comparable). Every layer's
    work is proportional to its feature-map area and to the batch, so ``flops / B * imgsz**2 / (h * w)`` is exact
    when ``h``, ``w`` and ``imgsz`` are multiples of the largest stride; counting at 640 would cost a full-size
    forward.
    """
    b, _c, h, w = (int(v) for v in shape)
    return flops / b * (imgsz * imgsz) / (h * w) / 1e9

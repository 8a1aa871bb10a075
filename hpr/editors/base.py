"""The Editor interface, the table of editor classes that saved editors load through, and saving/loading.

An editor is data (a frozen config + named tensors) plus the hooks it derives from them. Hooks reach a
model only inside ``with editor.applied(model):``; everything that can fail (shape checks, hook
construction) happens before they attach, and TransformerLens's ``model.hooks`` removes them on exit,
including on error. One thread at a time may apply editors to a model (:func:`exclusive_use`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import math
import numbers
import operator
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from hpr import positions
from hpr.files import atomic_write, write_json

Hook = tuple[str, Callable]
REGISTRY: dict[str, type[Editor]] = {}


# The largest magnitude a config number may have (strengths, scales): far above any setting that means anything,
# far below the overflow of a float32 activation it multiplies.
MAX_MAGNITUDE = 1e6

# A tensor's expected shape: one entry per dimension (None: any size), or None for any shape.
Shape = tuple[int | None, ...] | None


def whole_numbers(values, what: str) -> tuple[int, ...]:
    """``values`` as a tuple of non-negative ints, or a ``ValueError``: no bools, floats (``1.5``, ``1.0``) or
    strings (``"0"``), which ``int()`` would quietly coerce."""
    checked = []
    for value in values:
        try:
            index = None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            index = None
        if index is None or index < 0:
            raise ValueError(f"{what} must be non-negative ints, got {value!r} ({type(value).__name__}) in {values!r}")
        checked.append(index)
    return tuple(checked)


def distinct_layers(layers, method: str) -> tuple[int, ...]:
    """``layers`` as a tuple of ints, or a ``ValueError`` if any is not an int, repeats or is negative (an editor
    config's check)."""
    checked = whole_numbers(layers, f"{method} layers")
    if len(set(checked)) != len(checked):
        raise ValueError(f"{method} layers must be distinct non-negative ints, got {layers!r}")
    return checked


def check_layers_in_range(method: str, layers, n_layers: int) -> None:
    """Refuse layers outside ``0 .. n_layers - 1``, naming them: one check and one message for every editor."""
    bad = sorted({layer for layer in layers if not 0 <= layer < n_layers})
    if bad:
        raise ValueError(f"{method} layers {bad} out of range for a {n_layers}-layer model")


def applied_if_any(editor: Editor | None, model):
    """``editor.applied(model)``, or a context that changes nothing when there is no editor (the base model)."""
    return editor.applied(model) if editor is not None else contextlib.nullcontext()


def recorded_head_shape(editor: Editor) -> tuple[int, int]:
    """``(n_heads, d_head)`` of the model a head-level editor (ITI, LoRA) was fitted on, from its state's
    ``head_shape`` tensor."""
    if "head_shape" not in editor.tensors:
        raise ValueError(f"{editor.method} editor state has no 'head_shape' tensor (n_heads, d_head)")
    n_heads, d_head = (int(x) for x in editor.tensors["head_shape"])
    return n_heads, d_head


def check_number(value, what: str, low: float = -MAX_MAGNITUDE, high: float = MAX_MAGNITUDE) -> float:
    """``value`` as a float, or a ``ValueError`` unless it is a finite real number in ``[low, high]`` (no bool):
    an editor config's check of its strengths and scales."""
    number = None if isinstance(value, bool) or not isinstance(value, numbers.Real) else float(value)
    if number is None or not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"{what} must be a finite number >= {low:g} and <= {high:g}, got {value!r}")
    return number


def check_shapes(where: Path | str, tensors: Mapping[str, Tensor], expected: Mapping[str, Shape]) -> None:
    """Refuse editor state whose tensors differ from ``expected`` (an editor's :meth:`Editor.expected_shapes`):
    one missing, one not expected (names with ``*`` are fnmatch patterns), or one of another shape."""
    patterns = [name for name in expected if "*" in name]
    missing = [name for name in expected if name not in patterns and name not in tensors]
    unknown = [n for n in tensors if n not in expected and not any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    for names, what in ((missing, "lacks"), (unknown, "holds unexpected")):
        if names:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise ValueError(f"{where} {what} tensor(s) {shown} ({len(names)} in all); refit the editor")
    for name, shape in expected.items():
        if name in patterns or shape is None:
            continue
        actual = tuple(tensors[name].shape)
        if len(actual) != len(shape) or any(
            want is not None and want != got for want, got in zip(shape, actual, strict=True)
        ):
            want = "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
            raise ValueError(f"{where}: tensor {name!r} has shape {list(actual)}, expected {want}; refit the editor")


# model -> (the thread applying editors to it, how deeply nested): see exclusive_use.
_IN_USE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_IN_USE_LOCK = threading.Lock()


@contextlib.contextmanager
def exclusive_use(model, method: str) -> Iterator[None]:
    """Hold ``model`` for the calling thread while an editor is applied to it; a ``RuntimeError`` at once if
    another thread holds it (hooks and swapped weights act on every forward pass of the model, whichever
    thread runs it, so both threads' results would be wrong). Nested use in the same thread is allowed."""
    me = threading.get_ident()
    with _IN_USE_LOCK:
        owner, depth = _IN_USE.get(model, (me, 0))
        if owner != me:
            raise RuntimeError(
                f"{method} editor: another thread is applying an editor to this model, and its edits would reach "
                "this thread's forward passes too (and this one's, that thread's); serialise the calls (one lock "
                "around each `with editor.applied(model):` and every other use of the model) or give each thread "
                "its own model"
            )
        _IN_USE[model] = (me, depth + 1)
    try:
        yield
    finally:
        with _IN_USE_LOCK:
            if depth:
                _IN_USE[model] = (me, depth)
            else:
                del _IN_USE[model]


def register(cls: type[Editor]) -> type[Editor]:
    REGISTRY[cls.method] = cls
    return cls


class Editor:
    """Base class. Subclasses set ``method`` and ``config_cls``, and implement :meth:`hooks`."""

    method: ClassVar[str]
    config_cls: ClassVar[type]

    # The config field that sets how strongly it edits (ITI's alpha, CAA's multiplier, ...), if it has one.
    strength: ClassVar[str | None] = None
    # Tensors that hold integers (shapes), not fitted values; every other tensor must be floating and finite.
    integer_tensors: ClassVar[frozenset[str]] = frozenset()
    # The config field that says what it edits (its layers; ITI's heads, SADI's elements): empty edits nothing.
    selection: ClassVar[str] = "layers"

    def __init__(self, config, tensors: dict[str, Tensor], d_model: int, n_layers: int, fitted_on: str | None = None):
        self.config = config
        self.tensors = tensors
        self.d_model = d_model
        self.n_layers = n_layers
        self.fitted_on = fitted_on  # hpr.models.model_fingerprint of the model it was fitted on, if known

    def _derived(self, config, tensors: dict[str, Tensor], d_model: int, n_layers: int):
        """Another editor of this class from the same fit (a new strength, positions, subset)."""
        return type(self)(config, tensors, d_model, n_layers, fitted_on=self.fitted_on)

    def for_any_model(self):
        """This editor without the record of the model it was fitted on: it applies to any model of the
        right shape (for deliberate transfers between checkpoints)."""
        return type(self)(self.config, self.tensors, self.d_model, self.n_layers)

    def check_identity(self, model) -> None:
        """Refuse a model other than the one the editor was fitted on, even of the same shape."""
        if self.fitted_on is None:
            return
        from hpr.models import fingerprint_like, short_fingerprint

        theirs = fingerprint_like(self.fitted_on, model)
        if theirs != self.fitted_on:
            raise ValueError(
                f"{self.method} editor was fitted on another model (fingerprint {short_fingerprint(self.fitted_on)};"
                f" this model's is {short_fingerprint(theirs)}), although the shapes match. Fit a new editor, or "
                "use editor.for_any_model() to apply it anyway."
            )

    def edited_layers(self) -> tuple[int, ...]:
        """The layers it edits (each must be below :attr:`n_layers`): its config's ``layers`` by default."""
        return tuple(self.config.layers)

    def expected_shapes(self) -> dict[str, Shape]:
        """Every tensor its state must hold, by name (or fnmatch pattern), with its shape, as its config,
        ``d_model`` and ``n_layers`` (and the depth of any stored network) imply; :func:`load_editor` refuses
        state that differs (:func:`check_shapes`)."""
        raise NotImplementedError

    def edit(self, layer: int, h: Tensor) -> Tensor:
        """``h`` of ``layer`` after the edit, for editors that rewrite activations (all but LoRA and reptune,
        which edit weights).

        An editor defines either this (a plain function of ``h``) or :meth:`edit_fn` (which may precompute per
        device); this default runs :meth:`edit_fn`'s function, so an ``edit`` override never needs to.
        """
        if type(self).edit_fn is Editor.edit_fn:
            raise NotImplementedError(f"{self.method} edits through its hooks only")
        return self.prepared_edit(layer, h.device)(h)

    def hooks(self, model) -> list[Hook]:
        """The editor's hooks, each position-wise on ``[batch, pos, ...]``; :meth:`position_hooks` restricts
        them to the positions the editor edits."""
        raise NotImplementedError

    @property
    def positions(self) -> str:
        """Which positions the editor edits (:mod:`hpr.positions`): its config's ``positions``, else ``all``."""
        return getattr(self.config, "positions", "all")

    def with_strength(self, value: float):
        """The same fitted editor at another strength (its config's :attr:`strength` field; 0 edits nothing)."""
        if self.strength is None:
            raise ValueError(f"{self.method} has no strength setting")
        config = dataclasses.replace(self.config, **{self.strength: value})
        return self._derived(config, self.tensors, self.d_model, self.n_layers)

    def with_positions(self, mode: str):
        """The same editor editing ``mode``'s positions (:data:`hpr.positions.MODES`)."""
        if not any(f.name == "positions" for f in dataclasses.fields(self.config)):
            raise ValueError(f"{self.method} edits weights, at every position; it has no positions setting")
        return self._derived(
            dataclasses.replace(self.config, positions=mode), self.tensors, self.d_model, self.n_layers
        )

    def position_hooks(self, model) -> list[Hook]:
        """:meth:`hooks`, each applied only at the positions :attr:`positions` selects."""
        return [(name, positions.positioned_hook(self.positions, self.method, fn)) for name, fn in self.hooks(model)]

    def check_model(self, model) -> None:
        if (model.cfg.d_model, model.cfg.n_layers) != (self.d_model, self.n_layers):
            raise ValueError(
                f"{self.method} editor was fitted on a model with d_model={self.d_model}, "
                f"n_layers={self.n_layers}; this model has d_model={model.cfg.d_model}, "
                f"n_layers={model.cfg.n_layers}. Fit a new editor for this model."
            )

    def resid_post_hooks(self, model, layers) -> list[Hook]:
        """``self.edit(layer, h)`` at ``blocks.{layer}.hook_resid_post`` of each layer, after a range check.

        For editors that rewrite the residual stream after chosen blocks (HPR, Diff, SEA).
        """
        check_layers_in_range(self.method, layers, model.cfg.n_layers)

        def make(layer: int):
            edit = self.prepared_edit(layer, model.cfg.device)

            def hook(h, hook):
                return edit(h)

            return hook

        return [(f"blocks.{layer}.hook_resid_post", make(layer)) for layer in layers]

    def edit_fn(self, layer: int, device) -> Callable[[Tensor], Tensor]:
        """``self.edit`` of one layer, with whatever it can precompute for ``device`` done up front (a hook
        runs once per forward pass: per token in generation). Subclasses override it to precompute."""
        if type(self).edit is Editor.edit:
            raise NotImplementedError(f"{self.method} edits through its hooks only")
        return lambda h: self.edit(layer, h)

    def prepared_edit(self, layer: int, device) -> Callable[[Tensor], Tensor]:
        """:meth:`edit_fn`, built once per (layer, device) and kept: entering ``applied()`` again (once per
        evaluation, generation or, in the bench, per forward pass) reuses it. The cache is the one thing an
        editor keeps about its use; its config and tensors never change after it is made."""
        key = (layer, str(torch.device(device)))
        prepared = self.__dict__.setdefault("_prepared_edits", {})
        if key not in prepared:
            prepared[key] = self.edit_fn(layer, device)
        return prepared[key]

    @contextlib.contextmanager
    def applied(self, model) -> Iterator[None]:
        """The edit in ``model`` inside the block, removed on exit (also on error).

        Not for concurrent use: while one thread has an editor applied to ``model``, ``applied`` on the same
        model from another thread raises ``RuntimeError`` at once (:func:`exclusive_use`); nesting in one
        thread (an editor applied inside another) works."""
        with exclusive_use(model, self.method):
            self.check_model(model)
            self.check_identity(model)
            hooks = self.position_hooks(model)  # built before anything attaches
            with model.hooks(fwd_hooks=hooks):
                yield

    def digest(self) -> str:
        """A fingerprint of what this editor does: its class, config and every tensor's dtype, shape and bytes.
        Two editors with one digest edit identically (a sweep scores such a pair once)."""
        import hashlib

        h = hashlib.sha256(f"{type(self).__name__}|{self.d_model}|{self.n_layers}|".encode())
        h.update(json.dumps(_jsonable(dataclasses.asdict(self.config)), sort_keys=True, default=str).encode())
        for name in sorted(self.tensors):
            t = self.tensors[name].detach().contiguous().cpu()
            h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def save(self, folder: Path, model=None) -> None:
        """``config.json`` + ``state.safetensors`` in ``folder``; with ``model``, the fingerprint of the model
        it was fitted on is recorded (else the one it already knows, if any) and checked whenever it is
        applied."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if model is not None:
            from hpr.models import model_fingerprint

            self.fitted_on = model_fingerprint(model)
        config = {
            "method": self.method,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "config": _jsonable(dataclasses.asdict(self.config)),
        }
        if self.fitted_on is not None:
            config["model_fingerprint"] = self.fitted_on
        atomic_write(
            folder / "state.safetensors",
            lambda p: save_file({k: v.contiguous().cpu() for k, v in self.tensors.items()}, p),
        )
        write_json(folder / "config.json", config)


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_editor(folder: str | Path, device=None) -> Editor:
    """Load any saved editor (``config.json`` + ``state.safetensors``), refusing one whose record or state is
    not what its method writes: fields of the wrong JSON type, numbers that are not finite or out of range,
    an empty or out-of-range selection of layers, tensors missing, unexpected, of the wrong shape or not finite."""
    from hpr.models import check_device

    folder = Path(folder)
    if device is not None:
        device = check_device(device)  # a device that is not there is named as such, not as damaged state
    path = folder / "config.json"
    record = _read_record(folder, path)
    cls = REGISTRY[record["method"]]
    kwargs = _config_kwargs(path, cls, record["config"])
    tensors = _read_state(folder / "state.safetensors", cls, device)
    try:
        config = cls.config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
    editor = cls(config, tensors, record["d_model"], record["n_layers"], fitted_on=record.get("model_fingerprint"))
    layers = editor.edited_layers()
    if not layers:
        raise ValueError(f"{path}: {cls.selection} is empty, so this {cls.method} editor would edit nothing; refit it")
    bad = sorted({layer for layer in layers if layer >= editor.n_layers})
    if bad:
        raise ValueError(
            f"{path}: layers {bad} are out of range for the {editor.n_layers}-layer model it records; refit the editor"
        )
    check_shapes(folder / "state.safetensors", tensors, editor.expected_shapes())
    return editor


def _read_record(folder: Path, path: Path) -> dict:
    """``config.json`` of an editor folder: a known method, its config object, ``d_model`` and ``n_layers``."""
    if not path.exists():
        raise FileNotFoundError(f"{folder} holds no editor (config.json missing)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}); refit the editor") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not an editor record (a JSON object); refit the editor")
    method = record.get("method")
    if method not in REGISTRY:
        raise ValueError(f"unknown editor method {method!r} in {folder}; known: {sorted(REGISTRY)}")
    missing = [k for k in ("config", "d_model", "n_layers") if k not in record]
    if missing or not isinstance(record.get("config"), dict):
        raise ValueError(f"{path} lacks {missing or ['a config object']}; refit the editor")
    for name, low in (("d_model", 0), ("n_layers", 1)):  # SADI records d_model 0 where it was not given
        _check_type(path, name, "int", record[name])
        if record[name] < low:
            raise ValueError(f"{path}: {name} must be >= {low}, got {record[name]}; refit the editor")
    return record


def _config_kwargs(path: Path, cls: type[Editor], raw: dict) -> dict:
    """The config's keyword arguments from its JSON object, each of the JSON type its field's annotation names."""
    fields = {f.name: f.type for f in dataclasses.fields(cls.config_cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ValueError(f"{path} has unknown fields for {cls.method}: {sorted(unknown)}")
    for name, value in raw.items():
        _check_type(path, name, str(fields[name]), value)
    kwargs = {k: _tuples(v) for k, v in raw.items()}
    if "positions" in fields and "positions" not in raw:
        # Saved before editors declared their positions, when every editor edited every position.
        kwargs["positions"] = "all"
    return kwargs


def _read_state(path: Path, cls: type[Editor], device) -> dict[str, Tensor]:
    """``state.safetensors``: readable, every tensor floating point and finite (but :attr:`Editor.integer_tensors`)."""
    try:
        tensors = load_file(path, device=str(device or "cpu"))
    except Exception as e:  # safetensors raises its own error types for truncated or garbage files
        raise ValueError(f"{path} cannot be read ({e}); refit the editor") from e
    for name, tensor in tensors.items():
        if name in cls.integer_tensors:
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} is {tensor.dtype}, not floating point")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {name!r} holds NaN or infinite values; refit")
    return tensors


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _check_type(path: Path, name: str, annotation: str, value) -> None:
    """A config value of the JSON type its field's annotation names (no ``"false"`` for a bool)."""
    kind = str(annotation).split("[")[0].strip()
    ok = {
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "tuple": lambda v: isinstance(v, list),
    }.get(kind)
    if ok is not None and not ok(value):
        finite = " (finite)" if kind == "float" else ""
        raise ValueError(
            f"{path}: {name} must be a {kind}{finite}, got {value!r} ({type(value).__name__}); refit the editor"
        )

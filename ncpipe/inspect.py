"""``ncpipe inspect``: a readable (or ``--json``) summary of a feature dump; ``--verify`` checks provenance.

Every inspection reads every stored byte once to check the datasets' Fletcher-32 checksums (the cost of one
sequential read of the file): a damaged dataset is an unreadable file (exit 2), named with the command that
regenerates it; ``--verify`` of a dump whose datasets carry no checksum (format < 1.2) says NOT VERIFIED
(exit 3) rather than vouch for bytes it cannot check.

Two file kinds are recognised by their layout (docs/hdf5-format.md): the per-cell feature dump
(``/{split}/{kind}/...`` plus ``/classifier``) and the layerwise file (``/layers/{layer}/{kind}/...``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .io import (
    SPLITS,
    DumpError,
    NotSupportedError,
    attrs_dict,
    checksum_report,
    damage_error,
    group_keys,
    kind_sort_key,
    layer_order,
    open_dump,
)

# Root attributes shown in the provenance block, in this order (the rest follow alphabetically).
PROVENANCE = ("format_version", "complete", "dataset", "arch", "width", "method", "training_adversary",
              "seed", "epoch", "num_classes", "feature_layer", "norm", "epsilon_255", "epsilon", "step",
              "steps", "restarts", "checkpoint", "checkpoint_sha256", "created_utc", "ncpipe_version",
              "torch_version")
MAX_CLASS_COLUMNS = 20
# Exit status of ``ncpipe inspect`` (documented in docs/hdf5-format.md and the README).
EXIT_OK = 0
EXIT_VERIFY_FAILED = 1  # --verify: the checkpoint's sha256 or the recomputed features do not match
EXIT_UNREADABLE = 2  # missing, truncated, incomplete or foreign file
EXIT_NOT_SUPPORTED = 3  # a readable ncpipe file, but the request does not apply to its kind

# Relative row-norm error allowed by --verify.  Any change of weights moves features by O(1); these bounds
# only absorb float16 storage rounding, TF32 convolutions on GPUs, and bf16 autocast (runtime.amp).
VERIFY_TOL = {"float32": 5e-3, "float16": 5e-3, "amp": 5e-2}


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def _root_attrs(f: h5py.File) -> dict[str, Any]:
    a = attrs_dict(f)
    for k in ("config", "training_adversary"):
        if isinstance(a.get(k), str) and a[k][:1] in "{[":
            a[k] = json.loads(a[k])
    return a


def _dataset_info(d: h5py.Dataset) -> dict[str, Any]:
    return {"shape": list(d.shape), "dtype": str(d.dtype), "chunks": list(d.chunks) if d.chunks else None,
            "compression": d.compression, "compression_opts": d.compression_opts, "shuffle": bool(d.shuffle),
            "fletcher32": bool(d.fletcher32),
            "stored_bytes": int(d.id.get_storage_size())}


def _counts(x: np.ndarray, c: int) -> list[int]:
    return np.bincount(x, minlength=c).tolist() if len(x) else [0] * c


def file_kind(f: h5py.File) -> str:
    if "layers" in f:
        return "layerwise"
    if "classifier" in f or any(s in f for s in SPLITS):
        return "features"
    return "unknown"


def summarize(path: str | os.PathLike) -> dict[str, Any]:
    """Everything ``inspect`` prints, as a JSON-able dict (``ncpipe inspect --json``)."""
    p = Path(path)
    # The layerwise file may come without the 'complete' flag; it is reported rather than refused.
    with open_dump(p, require_complete=False) as f:
        kind = file_kind(f)
        root = _root_attrs(f)
        if kind == "features" and not root.get("complete", False):
            raise DumpError(f"feature dump {p} is incomplete (no 'complete' attribute); rerun its job")
        if kind == "unknown":
            raise DumpError(f"{p} is an HDF5 file but neither an ncpipe feature dump nor a layerwise file "
                            f"(top-level members: {list(f)})")
        out: dict[str, Any] = {"file": str(p), "file_bytes": p.stat().st_size, "kind": kind, "attrs": root}
        c = int(root.get("num_classes", 0))
        if kind == "features":
            out["classifier"] = {n: _dataset_info(f[f"classifier/{n}"]) for n in ("weight", "bias")
                                 if f"classifier/{n}" in f}
            if not c and "classifier/bias" in f:
                c = int(f["classifier/bias"].shape[0])
            out["groups"] = [_feature_group(f, s, k, c) for s, k in group_keys(f)]
        else:
            out["groups"] = _layer_groups(f, c)
        report = checksum_report(f)
        if report["damaged"]:
            raise damage_error(p, report["damaged"])
        out["unchecksummed"] = report["unchecked"]
    return _jsonable(out)


def _feature_group(f: h5py.File, split: str, kind: str, c: int) -> dict[str, Any]:
    g = f[f"{split}/{kind}"]
    lab, pred = g["labels"][:], g["predictions"][:]
    c = max(c, int(lab.max(initial=-1)) + 1, int(pred.max(initial=-1)) + 1)
    return {"path": g.name, "split": split, "perturbation": kind, "num_samples": len(lab),
            "feature_dim": int(g["features"].shape[1]) if g["features"].ndim == 2 else None,
            "accuracy": float((pred == lab).mean()) if len(lab) else None,
            "class_counts": _counts(lab, c), "prediction_counts": _counts(pred, c),
            "datasets": {n: _dataset_info(g[n]) for n in g}, "attrs": attrs_dict(g)}


def _layer_groups(f: h5py.File, c: int) -> list[dict[str, Any]]:
    rows = []
    for layer in f["layers"]:
        la = attrs_dict(f[f"layers/{layer}"])
        for kind in sorted(f[f"layers/{layer}"], key=kind_sort_key):
            g = f[f"layers/{layer}/{kind}"]
            a = attrs_dict(g)
            lab = g["labels"][:] if "labels" in g else np.zeros(0, dtype=np.int64)
            cc = max(c, int(lab.max(initial=-1)) + 1)
            rows.append({"path": g.name, "layer": a.get("layer", la.get("layer", layer)),
                         "layer_index": a.get("layer_index", la.get("layer_index")), "perturbation": kind,
                         "original_shape": a.get("original_shape", la.get("original_shape")),
                         "num_samples": len(lab), "class_counts": _counts(lab, cc),
                         "datasets": {n: _dataset_info(g[n]) for n in g}, "attrs": a})
    # shallow to deep when the writer recorded layer_index, else by name
    rows.sort(key=lambda r: (r["layer_index"] if isinstance(r["layer_index"], int) else 1 << 30, r["layer"],
                             kind_sort_key(r["perturbation"])))
    return rows


# ---------------------------------------------------------------------------------------------- text output
def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _filters(d: dict[str, Any]) -> str:
    parts = ["shuffle"] if d["shuffle"] else []
    if d["compression"]:
        opts = f"({d['compression_opts']})" if d["compression_opts"] is not None else ""
        parts.append(d["compression"] + opts)
    if d["fletcher32"]:
        parts.append("fletcher32")
    return "+".join(parts) or "none"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    return ["  " + "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable form of :func:`summarize`'s dict."""
    a = s["attrs"]
    lines = [f"{s['file']}  ({_fmt_bytes(s['file_bytes'])}, ncpipe {s['kind']} file, "
             f"format_version {a.get('format_version', '?')}, "
             f"{'complete' if a.get('complete') else 'NOT marked complete'})", "", "provenance:"]
    shown = [k for k in PROVENANCE if k in a] + sorted(k for k in a if k not in PROVENANCE and k != "config")
    width = max((len(k) for k in shown), default=0)
    for k in shown:
        lines.append(f"  {k.ljust(width)}  {json.dumps(a[k]) if isinstance(a[k], dict | list) else a[k]}")
    if isinstance(a.get("config"), dict):
        lines.append(f"  {'config'.ljust(width)}  {json.dumps(a['config'], sort_keys=True)}")
    unchecked = s.get("unchecksummed")
    lines += ["", "integrity: NOT CHECKABLE, stored without a checksum (format < 1.2): "
              f"{', '.join(unchecked)}" if unchecked else
              "integrity: every dataset passed its Fletcher-32 checksum"]
    if s["kind"] == "features":
        cls = s.get("classifier", {})
        lines += ["", "classifier:"]
        lines += _table(["dataset", "shape", "dtype"], [[f"/classifier/{n}", "x".join(map(str, d["shape"])),
                                                         d["dtype"]] for n, d in cls.items()])
        lines += ["", "groups:"]
        rows = []
        for g in s["groups"]:
            d = g["datasets"]["features"]
            acc = "-" if g["accuracy"] is None else f"{g['accuracy']:.4f}"
            rows.append([g["path"], str(g["num_samples"]), str(g["feature_dim"]), d["dtype"],
                         "x".join(map(str, d["chunks"])) if d["chunks"] else "contiguous", _filters(d),
                         _fmt_bytes(d["stored_bytes"]), acc,
                         " ".join(sorted(set(g["datasets"]) - {"features"}))])
        lines += _table(["group", "N", "D", "dtype", "chunks", "filters", "stored", "accuracy", "also"], rows)
        c = len(s["groups"][0]["class_counts"]) if s["groups"] else 0
        if c <= MAX_CLASS_COLUMNS:
            lines += ["", "class counts (true labels | network predictions):"]
            rows = [[g["path"], *map(str, g["class_counts"]), "|", *map(str, g["prediction_counts"])]
                    for g in s["groups"]]
            lines += _table(["group", *map(str, range(c)), "|", *map(str, range(c))], rows)
        else:  # e.g. CIFAR-100: per-class columns would not fit a terminal
            lines += ["", f"class counts over {c} classes (min / max; --json has every count):"]
            rows = [[g["path"], f"{min(g['class_counts'])} / {max(g['class_counts'])}",
                     f"{min(g['prediction_counts'])} / {max(g['prediction_counts'])}",
                     str(sum(x > 0 for x in g["prediction_counts"]))] for g in s["groups"]]
            lines += _table(["group", "labels", "predictions", "classes predicted"], rows)
    else:
        lines += ["", "layers (shallow to deep):"]
        rows = []
        for g in s["groups"]:
            d = g["datasets"].get("features", {"shape": [], "dtype": "?"})
            rows.append([g["path"], str(g["layer_index"]), g["perturbation"], "x".join(map(str, d["shape"])),
                         d["dtype"], "x".join(map(str, g["original_shape"] or [])) or "?",
                         " ".join(map(str, g["class_counts"]))])
        header = ["group", "index", "perturbation", "shape", "dtype", "original shape", "class counts"]
        lines += _table(header, rows)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- verify
def _spread(n: int, rows: int) -> np.ndarray:
    """Up to ``rows`` row numbers spread evenly over ``0..n-1``."""
    return np.unique(np.linspace(0, n - 1, min(rows, n)).round().astype(np.int64)) if n else np.zeros(0, int)


def _stored_rows(f: h5py.File, rows: int) -> dict[str, dict[str, Any]]:
    """The clean rows ``--verify`` recomputes: per group, its split, the rows of the split, what is stored."""
    out: dict[str, dict[str, Any]] = {}
    if file_kind(f) == "layerwise":
        split = str(f.attrs.get("split", "train"))
        for layer in layer_order(f):
            if f"layers/{layer}/clean" not in f:
                continue
            g = f[f"layers/{layer}/clean"]
            if "indices" not in g:
                raise NotSupportedError(f"{g.name} has no 'indices' (the rows of the split it holds), so its "
                                        "features cannot be recomputed")
            sel = _spread(len(g["labels"]), rows)
            out[f"{layer}/clean"] = {"split": split, "layer": layer, "n": None, "rows": g["indices"][:][sel],
                                     "features": g["features"][sel], "labels": g["labels"][sel],
                                     "predictions": None, "dtype": str(g["features"].dtype)}
        return out
    for split in SPLITS:
        if f"{split}/clean" not in f:
            continue
        g = f[f"{split}/clean"]
        n = len(g["labels"])
        idx = _spread(n, rows)
        out[f"{split}/clean"] = {"split": split, "layer": None, "n": n, "rows": idx,
                                 "features": g["features"][idx], "labels": g["labels"][idx],
                                 "predictions": g["predictions"][idx], "dtype": str(g["features"].dtype)}
    return out


def _recompute(model: Any, x: Any, layer: str | None, pool: int) -> tuple[np.ndarray, Any]:
    """Clean features of ``x`` (uint8 images) at the penultimate layer, or at probe ``layer`` as the
    layerwise stage stores them (pooled, flattened); with the logits (None for a probe)."""
    import torch

    from .data import to_float

    xf = to_float(x)
    with torch.no_grad():
        if layer is None:
            h, logits = model.forward_features(xf)
            return h.double().numpy(), logits
        from .layerwise import ProbeHooks, pooled

        probes = dict(model.probe_layers())
        if layer not in probes:
            raise DumpError(f"the checkpoint's model has no probe {layer!r}; its probes: {list(probes)}")
        got: list[torch.Tensor] = []
        with ProbeHooks([(layer, probes[layer])]) as hooks:
            hooks.sink = lambda _name, out: got.append(pooled(out, pool).reshape(len(out), -1).float())
            model(xf)
        return got[0].double().numpy(), None


def verify_dump(path: str | os.PathLike, checkpoint: str | os.PathLike | None = None, rows: int = 8,
                data_dir: str | None = None) -> dict[str, Any]:
    """Recompute a few clean features from the checkpoint and compare; check the checkpoint's sha256.

    Feature dumps: the penultimate features of ``rows`` rows per split.  Layerwise files: every probe's stored
    (pooled, flattened) clean features of ``rows`` of its subsampled rows.  Returns ``{"ok": bool,
    "problems": [...], "checks": [...]}``; ``problems`` holds one readable sentence per failure.
    """
    import torch

    from .checkpoint import load_checkpoint
    from .data import load_data
    from .specs import FeaturesSpec, LayerwiseSpec, SpecError
    from .utils import sha256_file

    problems: list[str] = []
    checks: list[dict[str, Any]] = []
    with open_dump(path) as f:
        kind = file_kind(f)
        if kind == "unknown":
            raise NotSupportedError(f"{path}: --verify supports feature dumps and layerwise files only; "
                                    f"exit status {EXIT_NOT_SUPPORTED}")
        root = _root_attrs(f)
        stored = _stored_rows(f, rows)
    if not stored:
        raise DumpError(f"{path} has no clean group to verify against")
    ckpt_path = Path(checkpoint) if checkpoint else Path(str(root.get("checkpoint", "")))
    if not ckpt_path.is_file():
        problems.append(f"checkpoint {ckpt_path} (recorded in the dump's 'checkpoint' attribute) not found; "
                        "pass --checkpoint PATH")
        return {"ok": False, "problems": problems, "checks": checks, "checkpoint": str(ckpt_path)}
    sha = sha256_file(ckpt_path)
    recorded = root.get("checkpoint_sha256")
    checks.append({"check": "checkpoint_sha256", "recorded": recorded, "actual": sha, "ok": sha == recorded})
    if sha != recorded:
        problems.append(f"checkpoint {ckpt_path} has sha256 {sha} but the dump was made from {recorded}: the "
                        "checkpoint changed since extraction (rerun the features job, or pass the original "
                        "checkpoint with --checkpoint)")
    spec = root.get("config")
    if not isinstance(spec, dict) or "data" not in spec:
        problems.append("the dump's 'config' attribute holds no data spec; cannot reload the images")
        return {"ok": False, "problems": problems, "checks": checks, "checkpoint": str(ckpt_path)}
    if data_dir:
        spec = {**spec, "data": {**spec["data"], "dir": data_dir}}
    try:
        fspec = (LayerwiseSpec if kind == "layerwise" else FeaturesSpec).from_dict(spec, "the dump's config")
    except SpecError as err:
        problems.append(f"{err}; cannot reload the images")
        return {"ok": False, "problems": problems, "checks": checks, "checkpoint": str(ckpt_path)}
    pool = fspec.layerwise.pool if isinstance(fspec, LayerwiseSpec) else 0
    data = load_data(fspec)
    if fspec.external is not None:  # a model ncpipe did not train: rebuilt from its entry, from this file
        import dataclasses

        from .external import InputShape, load_external

        shape = InputShape(data.num_classes, data.in_channels, int(data.x_train.shape[-1]), data.stem)
        model, _ = load_external(dataclasses.replace(fspec.external, checkpoint=str(ckpt_path)), shape, "cpu")
    else:
        model, _ = load_checkpoint(ckpt_path, "cpu")
    amp = fspec.runtime.amp
    for name, st in stored.items():
        x, y = data.split(st["split"])
        idx = np.asarray(st["rows"], dtype=np.int64)
        if st["n"] is not None and len(x) != st["n"]:
            problems.append(f"{name}: the dataset now has {len(x)} images but the group has {st['n']} rows "
                            "(data subset settings differ)")
            continue
        if len(idx) and int(idx.max()) >= len(x):
            problems.append(f"{name}: rows up to {int(idx.max())} are stored but the {st['split']} split now "
                            f"has {len(x)} images (data subset settings differ)")
            continue
        h, logits = _recompute(model, x[torch.as_tensor(idx)], st["layer"], pool)
        ref = st["features"].astype(np.float64)
        err = np.linalg.norm(h - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
        tol = VERIFY_TOL["amp"] if amp else VERIFY_TOL.get(st["dtype"], VERIFY_TOL["float32"])
        ok_f = bool(np.all(err <= tol))
        ok_l = bool(np.array_equal(y[torch.as_tensor(idx)].numpy(), st["labels"]))
        check = {"check": f"{name} features", "rows": idx.tolist(),
                 "max_rel_error": float(err.max(initial=0)), "tolerance": tol, "labels_match": ok_l,
                 "ok": ok_f and ok_l}
        if logits is not None:
            check["predictions_match"] = int((logits.argmax(1).numpy() == st["predictions"]).sum())
        checks.append(check)
        if not ok_f:
            problems.append(f"{name}: features recomputed from {ckpt_path} differ from the stored "
                            f"ones (max relative error {err.max():.3g} > {tol:g} over rows {idx.tolist()})")
        if not ok_l:
            problems.append(f"{name}: stored labels differ from the dataset's (the data changed)")
    return {"ok": not problems, "problems": problems, "checks": checks, "checkpoint": str(ckpt_path)}


def format_verify(v: dict[str, Any]) -> str:
    lines = ["", f"verify against {v['checkpoint']}:"]
    for c in v["checks"]:
        mark = "ok  " if c["ok"] else "FAIL"
        if c["check"] == "checkpoint_sha256":
            lines.append(f"  {mark} checkpoint sha256 {c['actual'][:16]}... "
                         f"(recorded {str(c['recorded'])[:16]}...)")
        else:
            lines.append(f"  {mark} {c['check']}: rows {c['rows']}, "
                         f"max relative error {c['max_rel_error']:.2e} (tolerance {c['tolerance']:g})")
    lines += [f"  problem: {p}" for p in v["problems"]]
    lines.append("  VERIFIED" if v["ok"] else "  NOT VERIFIED" if v.get("unverifiable") else
                 "  VERIFICATION FAILED")
    return "\n".join(lines)


def run(path: str, *, as_json: bool = False, verify: bool = False, checkpoint: str | None = None,
        rows: int = 8, data_dir: str | None = None) -> tuple[str, int]:
    """The text ``ncpipe inspect`` prints and its exit status (``EXIT_OK``, ``EXIT_VERIFY_FAILED``, or
    ``EXIT_NOT_SUPPORTED`` for a ``--verify`` that passed on a file whose datasets carry no checksum).

    Raises ``DumpError`` for an unreadable file (``EXIT_UNREADABLE``) and ``NotSupportedError`` for a request
    that does not apply to the file's kind (``EXIT_NOT_SUPPORTED``).
    """
    s = summarize(path)
    v = verify_dump(path, checkpoint, rows=rows, data_dir=data_dir) if verify else None
    status = EXIT_OK if v is None or v["ok"] else EXIT_VERIFY_FAILED
    if v is not None and s.get("unchecksummed"):
        # the recomputed rows may match while an unchecked label elsewhere changed: never vouch for those
        status = EXIT_NOT_SUPPORTED if v["ok"] else status
        v["ok"] = False
        v["unverifiable"] = s["unchecksummed"]
        v["problems"].append(f"datasets stored without a checksum cannot be verified: "
                             f"{', '.join(s['unchecksummed'])}; regenerate the file with this ncpipe")
    if as_json:
        if v is not None:
            s["verify"] = _jsonable(v)
        return json.dumps(s, indent=2, sort_keys=False), status
    text = format_summary(s)
    if v is not None:
        text += "\n" + format_verify(v)
    return text, status

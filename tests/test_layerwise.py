"""ncpipe.layerwise: the streamed per-layer statistics equal the in-memory metrics of the hooked features."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ncpipe import attacks, cli, grid, metrics
from ncpipe.layerwise import COLUMNS, analyse_layers, first_per_class
from ncpipe.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from tiny_dump import WILDCARDS, make_checkpoint, tiny_config  # noqa: E402

C = 3


def tiny_net(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(arch, num_classes=C, in_channels=1, mean=[0.5], std=[0.25], width=0.0625).eval()


def hooked_features(net: torch.nn.Module, x: torch.Tensor, batch_size: int) -> dict[str, np.ndarray]:
    """Every probe's output for all of ``x``, held in memory (what the streaming code must never need)."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n, _ in net.probe_layers()}
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: out[n].append(o.detach().clone()))
               for n, m in net.probe_layers()]
    with torch.no_grad():
        for i in range(0, len(x), batch_size):  # same batches as the code under test: bitwise equal outputs
            net(x[i : i + batch_size])
    for h in handles:
        h.remove()
    return {n: torch.cat(v).numpy() for n, v in out.items()}


@pytest.mark.parametrize("arch", ["vgg11bn", "preactresnet18"])
def test_streamed_layer_stats_equal_in_memory_metrics(arch: str) -> None:
    net = tiny_net(arch)
    gen = torch.Generator().manual_seed(0)
    n, bs = 45, 16  # a ragged last batch
    x = torch.randint(0, 256, (n, 1, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.arange(n) % C
    x[y == 1] = x[y == 1] // 2  # some class structure, so the metrics are not all alike
    made: list[torch.Tensor] = []

    def attack(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        xp = attacks.perturb("pgd", net, xb, yb, norm="linf", epsilon=0.1, step=0.05, steps=1, generator=gen)
        made.append(xp.clone())
        return xp

    res = analyse_layers(net, net.probe_layers(), x, y, num_classes=C, batch_size=bs, attack=attack,
                         per_class=4, pool=2)
    clean = hooked_features(net, x.float() / 255, bs)
    pgd = hooked_features(net, torch.cat(made), bs)
    yn = y.numpy()
    keep = first_per_class(yn, 4)
    assert res["names"] == [name for name, _ in net.probe_layers()]
    for name in res["names"]:
        feats = {"clean": clean[name], "pgd": pgd[name]}
        clean_means = metrics.class_means(feats["clean"].reshape(n, -1), yn, C)[0]
        for kind, h in feats.items():
            flat = h.reshape(n, -1)
            want = metrics.neural_collapse(flat, yn, num_classes=C)
            got = res["metrics"][(kind, name)]
            assert got["nc1"] == pytest.approx(want["nc1"], rel=1e-9), (kind, name)
            assert got["nc1_over_c"] == pytest.approx(want["nc1_over_c"], rel=1e-9)
            assert got["ncc_accuracy_own_means"] == want["ncc_accuracy"]
            with_clean = float((metrics.ncc_predict(flat, clean_means) == yn).mean())
            assert got["ncc_accuracy_clean_means"] == with_clean
            # the stored subsample: first 4 per class, 2 x 2 average-pooled where the map is larger
            sub, lab, idx = res["subsample"][(kind, name)]
            t = torch.from_numpy(h[keep])
            if t.ndim == 4 and t.shape[-1] > 2:
                t = F.adaptive_avg_pool2d(t, 2)
            np.testing.assert_allclose(sub, t.reshape(len(t), -1).numpy(), rtol=1e-6, atol=1e-7)
            assert np.array_equal(idx, np.flatnonzero(keep)) and np.array_equal(lab, yn[keep])
        assert res["shapes"][name] == clean[name].shape[1:]
    # the attack did something: the perturbed deepest-layer features differ from the clean ones
    last = res["names"][-1]
    assert not np.allclose(clean[last], pgd[last])


def test_first_per_class() -> None:
    y = np.array([2, 0, 2, 2, 1, 0, 2, 1])
    assert np.flatnonzero(first_per_class(y, 2)).tolist() == [0, 1, 2, 4, 5, 7]
    assert first_per_class(y, 0).sum() == 0 and first_per_class(y, 10).all()


def test_cli_end_to_end(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path)
    spec = json.loads(grid.layerwise_spec(tiny_config(), WILDCARDS))
    spec["layerwise"].update(per_class=2, pool=2)
    out_csv, out_h5 = tmp_path / "lw.csv", tmp_path / "lw.h5"
    cli.main(["--threads", "1", "layerwise", "--spec", json.dumps(spec), "--checkpoint", str(ckpt),
              "--out-csv", str(out_csv), "--out-h5", str(out_h5)])
    df = pd.read_csv(out_csv)
    assert list(df.columns) == COLUMNS
    probes = df.drop_duplicates("layer_index").sort_values("layer_index")["layer"].tolist()
    assert len(probes) == 8  # VGG11: the inputs of conv2..conv8 and the last ReLU (paper.md 2.8)
    assert set(df["metric"]) == {"nc1", "nc1_over_c", "ncc_accuracy_own_means", "ncc_accuracy_clean_means"}
    assert len(df) == 8 * 2 * 4 and np.isfinite(df["value"]).all()
    assert (df["regime"] == "st").all() and (df["split"] == "train").all() and (df["epsilon"] == 64).all()
    wide = df.pivot_table(index=["perturbation", "layer"], columns="metric", values="value")
    np.testing.assert_array_equal(wide.loc["clean", "ncc_accuracy_clean_means"],
                                  wide.loc["clean", "ncc_accuracy_own_means"])
    np.testing.assert_allclose(wide["nc1_over_c"] * 10, wide["nc1"], rtol=1e-12)
    with h5py.File(out_h5) as f:
        assert f.attrs["complete"] and f.attrs["per_class"] == 2 and f.attrs["split"] == "train"
        assert set(f["layers"]) == set(probes)
        g = f[f"layers/{probes[0]}/pgd"]
        assert g["features"].shape == (20, int(np.prod(g.attrs["stored_shape"])))  # 2 per class x 10 classes
        assert g.attrs["layer_index"] == 0 and list(g.attrs["stored_shape"])[1:] == [2, 2]
        assert g.attrs["nc1"] == pytest.approx(wide.loc[("pgd", probes[0]), "nc1"], rel=1e-12)
        assert np.array_equal(np.bincount(g["labels"][:]), [2] * 10)
    from ncpipe.inspect import summarize

    assert summarize(out_h5)["kind"] == "layerwise"
    agg = tmp_path / "all.csv"
    cli.main(["aggregate-layerwise", "--out", str(agg), str(out_csv), str(out_csv)])
    assert len(pd.read_csv(agg)) == 2 * len(df)

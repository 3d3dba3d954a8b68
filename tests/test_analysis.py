"""The analysis experiments: each quick path on tiny settings, asserting the direction of the
claims (so a broken implementation fails), plus the hook machinery."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from reslab.analysis import gradflow, lesion, ode, responses, toy
from reslab.analysis.hooks import GradientRecorder, count_hooks, find_blocks, find_weight_layers
from reslab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


# -- seed 000's toy --------------------------------------------------------------------------------


def test_toy_autograd_equals_product_formula() -> None:
    res = toy.seed_toy(weights=(0.8, -1.5, 1.2), y0=1.0)
    for kind in ("plain", "residual"):
        assert res[kind]["autograd"] == pytest.approx(res[kind]["grad"], rel=1e-12, abs=1e-15)
    # The factors of dL/dW0 are (1 + da_j/dy_{j-1}) = 1 + sigma'(W y) W for j = 3, 2.
    w, ys = (0.8, -1.5, 1.2), res["residual"]["y"]
    expected = []
    for j in (3, 2):
        s = torch.sigmoid(torch.tensor(w[j - 1] * ys[j - 1], dtype=torch.float64))
        expected.append(1.0 + float(s * (1 - s)) * w[j - 1])
    assert res["residual"]["factors"][0] == pytest.approx(expected, rel=1e-12)


def test_toy_chain_plain_vanishes_residual_does_not() -> None:
    rows = toy.chain_gradients((3, 30))
    for r in rows:
        assert r["plain_autograd"] == pytest.approx(r["plain_formula"], rel=1e-10)
        assert r["residual_autograd"] == pytest.approx(r["residual_formula"], rel=1e-10)
    assert abs(rows[1]["plain_autograd"]) < 1e-12 * abs(rows[0]["plain_autograd"])
    assert abs(rows[1]["residual_autograd"]) > abs(rows[0]["residual_autograd"])


# -- hooks -----------------------------------------------------------------------------------------


def test_recorder_matches_autograd_and_leaves_no_hook() -> None:
    torch.manual_seed(0)
    model = gradflow.dense_model(5, activation="tanh").double()
    x = torch.randn(16, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    outs = {}
    blocks = find_blocks(model)
    with GradientRecorder(blocks, capture=lambda n, t: outs.__setitem__(n, t)) as rec:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, [outs[n] for n, _ in blocks], retain_graph=True)
        loss.backward()
    for r, g in zip(rec.records(), grads, strict=True):
        assert r.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
    assert count_hooks(model) == 0


def test_gradient_profile_on_inplace_torchvision_resnet() -> None:
    """torchvision uses ReLU(inplace=True) and `out += identity`: full backward hooks would fail
    (pytorch#61519); tensor hooks registered from forward hooks work and leave nothing behind."""
    model = torchvision.models.resnet18(num_classes=10)
    before = {n: p.grad for n, p in model.named_parameters()}
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    prof = gradflow.gradient_profile(model, x, y)
    assert len(prof.blocks) == 8 and len(prof.weights) == len(find_weight_layers(model))
    assert prof.weights[0]["name"] == "conv1" and prof.weights[-1]["name"] == "fc"
    assert all(b["grad_norm"] > 0 and b["grad_norm"] < float("inf") for b in prof.blocks)
    assert all(w["act_grad_norm"] > 0 for w in prof.weights)
    assert count_hooks(model) == 0
    assert all(p.grad is before[n] for n, p in model.named_parameters())  # grads restored
    assert model.training  # mode restored


# -- gradient flow: the direction of the claims ----------------------------------------------------


@pytest.mark.parametrize(("activation", "gain"), [("sigmoid", 1.0), ("tanh", 0.5)])
def test_dense_plain_vanishes_residual_does_not(activation: str, gain: float) -> None:
    """Per-layer Jacobian norm < 1 (sigmoid, or a small gain), no normalisation: the plain net's
    first/last ratio falls by orders of magnitude from L=10 to L=100; the residual one's does not
    (seed 000; He et al. 2016 eq. 5)."""
    rows, _ = gradflow.dense_sweep((10, 100), [(activation, gain)], batch_size=64)
    r = {(row["family"], row["depth"]): row for row in rows}
    plain_fall = r["plain", 10]["first_last_ratio"] / r["plain", 100]["first_last_ratio"]
    res_fall = r["residual", 10]["first_last_ratio"] / r["residual", 100]["first_last_ratio"]
    assert plain_fall > 1e10
    assert res_fall < 100
    assert r["plain", 100]["block_ratio"] < 1e-20
    assert 0.5 < r["residual", 100]["block_ratio"] < 20


def test_dense_plain_large_gain_explodes() -> None:
    rows, _ = gradflow.dense_sweep((10, 100), [("tanh", 4.0)], batch_size=64)
    r = {(row["family"], row["depth"]): row for row in rows}
    assert r["plain", 100]["first_last_ratio"] > 1e5 * r["plain", 10]["first_last_ratio"]


def test_bn_plain_net_explodes_at_init_resnet_does_not() -> None:
    """Seed 001's point, made sharper: with BN the plain net's gradients do not vanish - at
    initialisation they *grow* towards the input; the ResNet's stay within a small factor."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    ratios = {}
    for family in ("plain", "resnet"):
        torch.manual_seed(0)
        ratios[family] = gradflow.gradient_profile(gradflow.conv_model(family, 44), x, y)
    assert ratios["plain"].first_last_ratio > 100
    assert ratios["plain"].first_last_ratio > 50 * ratios["resnet"].first_last_ratio
    assert 0.05 < ratios["resnet"].first_last_ratio < 20


# -- the ODE view ----------------------------------------------------------------------------------


def test_euler_distance_shrinks_like_one_over_L() -> None:
    rows = ode.euler_convergence((4, 16, 64), width=8, batch_size=16)
    errs = [r["relative_error_to_ode"] for r in rows]
    assert errs[0] > errs[1] > errs[2]
    assert 2.5 < errs[0] / errs[1] < 6 and 2.5 < errs[1] / errs[2] < 6  # first order: ~4x per 4x


def test_small_tau_keeps_gradients_near_identity() -> None:
    rows = ode.tau_gradient_sweep((0.01, 1.0), depth=50, activations=("relu",))
    small, big = rows
    assert abs(small["block_ratio"] - 1) < 0.1
    assert big["block_ratio"] > 10 * small["block_ratio"]


# -- trained twins on digits: lesion and responses -------------------------------------------------


@pytest.fixture(scope="module")
def trained_twins():
    from reslab.analysis.training import cifar_net, recipe, train_net
    from reslab.data import load_data

    torch.set_num_threads(1)
    splits = load_data("digits")
    cfg = recipe("digits", 200)
    nets = {}
    for family in ("resnet", "plain"):
        torch.manual_seed(0)
        model = cifar_net(20, residual=family == "resnet", in_channels=1)
        nets[family] = train_net(family, model, splits, cfg).model
    return splits, nets


def test_lesion_hurts_plain_far_more(trained_twins) -> None:
    splits, nets = trained_twins
    res = {k: lesion.lesion_study(m, splits.test) for k, m in nets.items()}
    assert res["resnet"]["baseline_accuracy"] > 0.8 and res["plain"]["baseline_accuracy"] > 0.5
    assert res["plain"]["mean_drop_same_shape"] > 0.5
    assert res["plain"]["mean_drop_same_shape"] > 3 * res["resnet"]["mean_drop_same_shape"]
    # Late units: harmless to delete in the ResNet, fatal in the plain net (Veit et al. 2016).
    late = {
        k: [
            u["drop"]
            for u in v["units"]
            if u["unit"].startswith("layer3") and u["drop"] is not None
        ]
        for k, v in res.items()
    }
    assert max(late["resnet"]) < 0.1 and min(late["plain"]) > 0.3
    # The lesion is temporary: the intact model is back afterwards.
    assert lesion.lesion_study(nets["resnet"], splits.test)["baseline_accuracy"] == pytest.approx(
        res["resnet"]["baseline_accuracy"]
    )


def test_residual_responses_smaller_than_plain(trained_twins) -> None:
    splits, nets = trained_twins
    std = {}
    for k, m in nets.items():
        r = responses.branch_responses(m, m.input_norm(splits.test.images))
        assert len(r["units"]) == 9 and len(r["layers"]) == 19  # the stem and 18 in units
        std[k] = sum(u["std"] for u in r["units"]) / len(r["units"])
    assert std["resnet"] < std["plain"]


# -- the CLI ---------------------------------------------------------------------------------------


def test_cli_gradflow_models_writes_ratio_per_model(tmp_path, capsys) -> None:
    out = tmp_path / "gf"
    assert (
        main(["analyze", "gradflow", "dense_plain100", "dense_resnet100", "--out", str(out)]) == 0
    )
    data = json.loads((out / "gradflow.json").read_text())
    assert (
        data["dense_plain100"]["first_last_ratio"]
        < 1e-6 * data["dense_resnet100"]["first_last_ratio"]
    )
    assert "git_revision" in data["meta"] and (out / "gradflow_models.png").stat().st_size > 0
    assert "dense_plain100" in capsys.readouterr().out


def test_cli_toy(tmp_path) -> None:
    assert main(["analyze", "toy", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "toy.json").read_text())
    assert data["seed_toy"]["residual"]["max_abs_diff"] < 1e-12
    assert (tmp_path / "toy_chain.png").exists()


@pytest.mark.parametrize("experiment", ["degradation", "orderings"])
def test_cli_training_experiments_tiny(tmp_path, experiment) -> None:
    """Mechanics only (a few steps): JSON with every run, a figure, the paper's numbers."""
    extra = ["--depths", "8"] if experiment == "degradation" else ["--depth", "8"]
    args = ["analyze", experiment, "--quick", "--iters", "4", "--out", str(tmp_path), *extra]
    assert main(args) == 0
    data = json.loads((tmp_path / f"{experiment}.json").read_text())
    assert len(data["runs"]) == (2 if experiment == "degradation" else 5)
    assert all(r["history"] for r in data["runs"])
    if experiment == "orderings":
        assert [r["paper_resnet110_test_error"] for r in data["runs"]] == [
            6.61,
            8.17,
            7.84,
            6.71,
            6.37,
        ]
    assert list(tmp_path.glob("*.png"))


def test_cli_gradflow_on_a_checkpoint(tmp_path) -> None:
    from reslab.train.checkpoint import model_record, save_checkpoint

    torch.manual_seed(0)
    model = gradflow.dense_model(10, activation="tanh")
    ckpt = tmp_path / "dense.pt"
    save_checkpoint(model_record(model), ckpt)
    assert main(["analyze", "gradflow", str(ckpt), "--out", str(tmp_path / "gf")]) == 0
    data = json.loads((tmp_path / "gf" / "gradflow.json").read_text())
    x, y, _ = gradflow.sample_batch(model, 8)
    expected = gradflow.gradient_profile(model, x, y).first_last_ratio
    assert data[str(ckpt)]["first_last_ratio"] == pytest.approx(expected, rel=1e-5)


_FULL_DISK = """
import json, resource, signal, sys
from pathlib import Path
from reslab.record import write_json
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail like a full disk
out = Path(sys.argv[1])
big = {"values": list(range(5000))}
for name, write in (("a.json", lambda: write_json(out / "a.json", big)),
                    ("b.json", lambda: write_json(out / "b.json", big, indent=1))):
    (out / name).write_text(json.dumps({"old": "result"}))
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    try:
        write()
        raise SystemExit(f"{name}: the write should have failed")
    except OSError:
        pass
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
"""


def test_a_failed_result_write_keeps_the_previous_result(tmp_path) -> None:
    """Experiment JSON (and run JSON) go through a temporary file: a write that fails part-way
    (a full disk, simulated with RLIMIT_FSIZE) leaves the previous file whole."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr + done.stdout
    for name in ("a.json", "b.json"):
        assert json.loads((tmp_path / name).read_text()) == {"old": "result"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temporaries


# -- repeatability and bookkeeping -------------------------------------------------------------


def test_training_experiments_repeat_whatever_ran_before() -> None:
    """Every net's initialisation comes from the seed: the first net used to take torch's
    unseeded default RNG, so plain-20 and 'original' changed from run to run."""
    import dataclasses

    from reslab.analysis.degradation import degradation_runs
    from reslab.analysis.orderings import ordering_runs
    from reslab.analysis.training import recipe
    from reslab.data import load_data

    splits = load_data("digits")
    cfg = dataclasses.replace(recipe("digits", 3), eval_every=3)
    quiet = {"log": lambda *a: None}
    rows = []
    for ambient in (1, 2):  # another RNG state before each call, as after other experiments
        torch.manual_seed(ambient)
        deg = degradation_runs(splits, cfg, depths=(8,), **quiet)
        torch.manual_seed(ambient)
        order = ordering_runs(splits, cfg, depth=8, orderings=("original",), **quiet)
        rows.append([(r.get("final_train_error"), r["test_error"]) for r in deg + order])
    assert rows[0] == rows[1]


def test_training_experiments_report_single_view_test_error() -> None:
    """With an eval_flip recipe the summary's accuracy averages a mirror; the tables must use
    one view like their curves and train errors."""
    import dataclasses

    from reslab.analysis.orderings import ordering_runs
    from reslab.analysis.training import recipe
    from reslab.data import load_data

    cfg = dataclasses.replace(recipe("digits", 4), eval_every=4, eval_flip=True, flip=True)
    splits = load_data("digits")
    (row,) = ordering_runs(splits, cfg, depth=8, orderings=("original",), log=lambda *a: None)
    assert row["test_error"] == pytest.approx(100 * row["history"][-1]["test_error"])


def test_gradient_profile_leaves_batchnorm_statistics_alone() -> None:
    from reslab import create_model

    model = create_model("cifar_resnet20").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradflow.gradient_profile(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dense_reset_classifier_without_a_read_out_layer() -> None:
    from reslab.models.dense import seed_example

    model = seed_example()  # num_classes=0: fc is the identity
    model.reset_classifier(3)
    assert model(torch.randn(2, 1)).shape == (2, 3)


def test_responses_count_every_3x3_layer_as_fig_7() -> None:
    """The stem's 3x3 conv is one of Fig. 7's layers: 19 for a 20-layer net (18 in its units)."""
    model = responses.cifar_net(20, residual=True, in_channels=1)
    res = responses.branch_responses(model, torch.randn(8, 1, 8, 8))
    assert len(res["layers"]) == 19 and res["layers"][0]["name"] == "stem.bn1"
    assert len(res["units"]) == 9 and res["layers"][0] not in res["units"]

"""Checkpoints: round trips, atomic saves, refusing pickle, clear errors, and the shipped priors."""

import json
import os
import pickle

import pyro
import pytest
import safetensors.torch
import torch
from torch.distributions import MultivariateNormal

from pyro_scoreflow import VPSDE, GaussianMixtureScore, ScoreSDEPrior, SubVPSDE, datasets
from pyro_scoreflow.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
    load_checkpoint,
    pretrained_names,
    read_config,
    save_checkpoint,
)
from pyro_scoreflow.networks import ScoreNet
from pyro_scoreflow.training import fit

TINY = {"hidden": 16, "num_layers": 1, "embed_dim": 8}
SHIPPED = {"moons": (2,), "checkerboard": (2,), "digits": (64,)}


def tiny_prior(seed=0, sde=None, event_shape=(2,), net_shape=None, dtype=torch.float32, **net_kwargs):
    """A small ScoreNet with random (non-zero) weights, so that log_prob depends on every weight."""
    sde = sde or VPSDE()
    torch.manual_seed(seed)
    net = ScoreNet(sde, net_shape or event_shape, **{**TINY, **net_kwargs}).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    # fixed-step rk4 for log_prob keeps these tests fast; the options must survive the round trip
    return ScoreSDEPrior(net, sde, event_shape, ode_method="rk4", atol=1e-4, num_steps=10)


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        config[key] = value
    path.write_text(json.dumps(config))


# -- round trips -------------------------------------------------------------------------------
def test_round_trip_gives_identical_log_prob_and_samples(tmp_path):
    prior = tiny_prior()
    prior.save_pretrained(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary directories left behind
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors"]
    loaded = ScoreSDEPrior.from_pretrained(tmp_path / "ck")
    assert loaded.sde == prior.sde and loaded.event_shape == prior.event_shape
    assert loaded.options == prior.options
    x = torch.randn(7, 2)
    with torch.no_grad():  # (with grad enabled the original's weights require grad: a different autograd path)
        assert torch.equal(loaded.log_prob(x), prior.log_prob(x))
    pyro.set_rng_seed(3)
    a = prior.sample((30,))
    pyro.set_rng_seed(3)
    b = loaded.sample((30,))
    assert torch.equal(a, b)
    # options given to from_pretrained override the saved ones
    assert ScoreSDEPrior.from_pretrained(str(tmp_path / "ck"), sampler="ode").sampler == "ode"


def test_config_contents_and_no_pickle(tmp_path):
    prior = tiny_prior(sde=SubVPSDE(beta_max=15.0))
    prior.save_pretrained(tmp_path)
    config = read_config(tmp_path)
    assert config["format_version"] == 1 and config["package_version"]
    assert config["sde"] == {"type": "SubVPSDE", "params": SubVPSDE(beta_max=15.0).config()["params"]}
    assert config["network"]["class"] == "ScoreNet" and config["network"]["config"]["hidden"] == 16
    assert config["event_shape"] == [2] and config["dtype"] == "float32"
    assert config["options"]["ode_method"] == "rk4" and config["options"]["num_steps"] == 10
    raw = (tmp_path / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and json.loads(raw[8 : 8 + header_len])  # a JSON header, not a pickle
    assert b"\x80\x04" not in raw[:2] and b"torch._utils" not in raw


def test_loaded_model_is_frozen_and_can_be_fine_tuned(tmp_path):
    tiny_prior().save_pretrained(tmp_path)
    model, sde, event_shape, options = load_checkpoint(tmp_path)
    assert isinstance(model, ScoreNet) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert event_shape == torch.Size([2]) and options["atol"] == 1e-4
    prior = ScoreSDEPrior(model, sde, event_shape, **options)
    x = torch.randn(3, 2, requires_grad=True)
    prior.log_prob(x).sum().backward()  # gradients with respect to the value still work
    assert x.grad is not None and torch.isfinite(x.grad).all()
    model.requires_grad_()  # documented way to fine-tune
    fit(model, sde, datasets.load("moons", 64), steps=2, batch_size=16, lr=1e-3, progress=False)


def test_float64_and_image_network_with_flat_event_shape(tmp_path):
    prior = tiny_prior(event_shape=(4,), net_shape=(1, 2, 2), dtype=torch.float64, channels=(4,), groups=2)
    prior.save_pretrained(tmp_path)
    config = read_config(tmp_path)
    assert config["dtype"] == "float64" and config["network"]["event_shape"] == [1, 2, 2]
    loaded = ScoreSDEPrior.from_pretrained(tmp_path)
    assert next(loaded.score_model.parameters()).dtype == torch.float64
    x = torch.randn(2, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), prior.log_prob(x))


def test_map_location(tmp_path):
    tiny_prior().save_pretrained(tmp_path)
    for location in ("cpu", torch.device("cpu")):
        model = load_checkpoint(tmp_path, map_location=location)[0]
        assert all(p.device.type == "cpu" for p in model.parameters())
    if torch.cuda.is_available():
        prior = ScoreSDEPrior.from_pretrained(tmp_path, map_location="cuda")
        assert next(prior.score_model.parameters()).is_cuda
        assert prior.sample((4,)).is_cuda
    with pytest.raises(ValueError, match="map_location"):
        load_checkpoint(tmp_path, map_location="not-a-device")


# -- atomic saves ------------------------------------------------------------------------------
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    old, new = tiny_prior(seed=0), tiny_prior(seed=1)
    target = tmp_path / "ck"
    old.save_pretrained(target)
    x = torch.randn(5, 2)
    expected = ScoreSDEPrior.from_pretrained(target).log_prob(x)

    def broken_writer(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_writer)
    with pytest.raises(OSError, match="injected"):
        new.save_pretrained(target)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # the temporary directory was removed
    assert torch.equal(ScoreSDEPrior.from_pretrained(target).log_prob(x), expected)

    # a failure of the final rename into place puts the old checkpoint back
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("rename failed (injected)")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        new.save_pretrained(target)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert torch.equal(ScoreSDEPrior.from_pretrained(target).log_prob(x), expected)

    new.save_pretrained(target)  # a successful save replaces it
    assert not torch.equal(ScoreSDEPrior.from_pretrained(target).log_prob(x), expected)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_save_keeps_other_files_and_refuses_non_checkpoint_directories(tmp_path):
    target = tmp_path / "ck"
    tiny_prior().save_pretrained(target)
    (target / "notes.txt").write_text("hello")
    tiny_prior(seed=1).save_pretrained(target)
    assert (target / "notes.txt").read_text() == "hello"
    busy = tmp_path / "work"
    busy.mkdir()
    (busy / "thesis.tex").write_text("do not delete")
    with pytest.raises(CheckpointError, match="non-empty directory"):
        tiny_prior().save_pretrained(busy)
    assert (busy / "thesis.tex").read_text() == "do not delete"


def test_only_score_nets_are_saved(tmp_path):
    sde = VPSDE()
    exact = GaussianMixtureScore(sde, torch.zeros(1, 2), torch.eye(2)[None])
    with pytest.raises(TypeError, match="only pyro_scoreflow.networks.ScoreNet"):
        ScoreSDEPrior(exact, sde, (2,)).save_pretrained(tmp_path / "a")

    class MyNet(ScoreNet):
        pass

    with pytest.raises(TypeError, match="MyNet"):
        save_checkpoint(tmp_path / "b", MyNet(sde, (2,), **TINY), sde, (2,), {})
    with pytest.raises(ValueError, match="SDE"):
        save_checkpoint(tmp_path / "c", ScoreNet(sde, (2,), **TINY), VPSDE(beta_max=10.0), (2,), {})
    assert not any(tmp_path.iterdir())


# -- refusing pickle ---------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a marker directory: stands in for arbitrary code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_files_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "model.pt").write_bytes(payload)
    for target in (evil, evil / "model.pt"):
        with pytest.raises(UnsafeCheckpointError, match="pickle"):
            ScoreSDEPrior.from_pretrained(target)
    torch.save(tiny_prior().score_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="arbitrary code"):
        load_checkpoint(tmp_path / "pytorch_model.bin")
    # a pickle disguised as the weights of a valid config is rejected by the safetensors parser
    disguised = tmp_path / "disguised"
    tiny_prior().save_pretrained(disguised)
    (disguised / "model.safetensors").write_bytes(payload)
    edit_config(disguised, weights_sha256=None)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(disguised)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: unpickling it would have run
    assert marker.exists()


# -- corrupted or mismatched checkpoints --------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "ck"
    tiny_prior().save_pretrained(directory)
    return directory


def test_truncated_or_corrupted_weights(saved):
    weights = saved / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(corrupted|SHA-256)"):
        load_checkpoint(saved)
    edit_config(saved, weights_sha256=None)  # without the checksum, the safetensors parser catches it
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a valid safetensors file"):
        load_checkpoint(saved)
    corrupted = bytearray(raw)
    corrupted[-3] ^= 0xFF  # a flipped bit in the tensor data: only the checksum notices
    weights.write_bytes(bytes(corrupted))
    load_checkpoint(saved)
    edit_config(saved, weights_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(saved)


def test_config_not_matching_weights(saved):
    config = json.loads((saved / "config.json").read_text())
    edit_config(saved, network={**config["network"], "config": {**config["network"]["config"], "hidden": 32}})
    with pytest.raises(CheckpointError, match=r"does not match the architecture.*shape mismatch"):
        load_checkpoint(saved)
    edit_config(saved, network={**config["network"], "config": {**config["network"]["config"], "num_layers": 2}})
    with pytest.raises(CheckpointError, match=r"missing keys backbone\.blocks\.1"):
        load_checkpoint(saved)
    edit_config(saved, network=config["network"], weights_sha256=None)
    tensors = safetensors.torch.load_file(str(saved / "model.safetensors"))
    safetensors.torch.save_file({**tensors, "extra.weight": torch.zeros(3)}, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected keys extra.weight"):
        load_checkpoint(saved)
    tensors["backbone.out.bias"] = torch.full_like(tensors["backbone.out.bias"], float("nan"))
    safetensors.torch.save_file(tensors, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"format_version": 99}, "format_version 99"),
        ({"format": "something-else"}, "not a pyro_scoreflow checkpoint"),
        ({"sde": {"type": "FancySDE", "params": {}}}, "invalid SDE"),
        ({"sde": {"type": "VPSDE", "params": {"beta_min": -1}}}, "beta_min"),
        ({"network": {"class": "os.system", "config": {}}}, "unsupported network class"),
        ({"event_shape": [3]}, "does not match network"),
        ({"event_shape": "2"}, "event_shape"),
        ({"dtype": "int8"}, "unsupported dtype"),
        ({"options": {"rtol": -1.0}}, "invalid solver options"),
    ],
)
def test_invalid_config_values(saved, change, match):
    edit_config(saved, **change)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(saved)
    assert "config.json" in str(info.value)


def test_unknown_options_are_dropped_with_a_warning(saved):
    """Options from another version (e.g. a newer one) do not make a checkpoint unloadable."""
    config = json.loads((saved / "config.json").read_text())
    edit_config(saved, options={**config["options"], "future_option": 1})
    with pytest.warns(UserWarning, match="ignoring solver options unknown to this version.*future_option"):
        options = load_checkpoint(saved)[3]
    assert "future_option" not in options and options["num_steps"] == 10


def test_file_modes_follow_the_umask(saved):
    if os.name != "posix":
        pytest.skip("POSIX file modes")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (saved.stat().st_mode & 0o777) == 0o777 & ~umask
    for name in ("config.json", "model.safetensors"):
        assert ((saved / name).stat().st_mode & 0o777) == 0o666 & ~umask


def test_missing_or_invalid_files(saved, tmp_path):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_checkpoint(saved)
    (saved / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_checkpoint(saved)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"config\.json not found"):
        load_checkpoint(saved)
    other = tmp_path / "other"
    tiny_prior().save_pretrained(other)
    (other / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"model\.safetensors not found"):
        load_checkpoint(other)
    with pytest.raises(CheckpointNotFoundError, match="neither a checkpoint directory"):
        load_checkpoint(tmp_path / "does-not-exist")


def test_unknown_name_lists_the_shipped_priors():
    with pytest.raises(CheckpointNotFoundError) as info:
        ScoreSDEPrior.from_pretrained("no-such-prior")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    for name in SHIPPED:
        assert name in str(info.value)


# -- shipped priors ------------------------------------------------------------------------------
def test_shipped_priors_are_listed():
    assert set(SHIPPED) <= set(pretrained_names())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_priors_load_and_work(name):
    prior = ScoreSDEPrior.from_pretrained(name, num_steps=20, rtol=1e-3, atol=1e-3)
    event_shape = SHIPPED[name]
    assert prior.event_shape == event_shape and isinstance(prior.sde, VPSDE)
    assert prior.sampler == "sde" and prior.score_model.training is False
    samples = prior.sample((3,))
    assert samples.shape == (3, *event_shape) and torch.isfinite(samples).all()
    with torch.no_grad():
        log_p = prior.log_prob(datasets.load(name, 2, seed=5))
    assert log_p.shape == (2,) and torch.isfinite(log_p).all()
    evaluation = read_config(name)["metadata"]["evaluation"]
    assert evaluation["log_lik_nats"] > evaluation["gaussian_log_lik_nats"]


def test_shipped_moons_beats_a_fitted_gaussian():
    """Fresh held-out points: the shipped prior's log-likelihood is well above a Gaussian fitted to the data."""
    held_out = datasets.load("moons", 1000, seed=123)
    train = datasets.load("moons", 10_000, seed=321)
    gaussian = MultivariateNormal(train.mean(0), torch.cov(train.T))
    prior = ScoreSDEPrior.from_pretrained("moons", rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        log_lik = prior.log_prob(held_out).mean().item()
    assert log_lik > gaussian.log_prob(held_out).mean().item() + 0.5  # measured about -1.72 vs -2.58 nats

"""Checkpoints: round trips, atomic saves, refusing pickle, clear errors, and the shipped priors."""

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pyro
import pytest
import safetensors.torch
import torch
from torch.distributions import MultivariateNormal

from pyro_scoreflow import VPSDE, GaussianMixtureScore, ScoreSDEPrior, SubVPSDE, datasets
from pyro_scoreflow import checkpoint as C
from pyro_scoreflow.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
    load_checkpoint,
    pretrained_names,
    pretrained_path,
    read_config,
    save_checkpoint,
    weights_file,
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
    listed = sorted(os.listdir(tmp_path / "ck"))
    assert listed == sorted(["config.json", "model.safetensors", weights_file(tmp_path / "ck").name])
    plain, named = (tmp_path / "ck" / "model.safetensors").read_bytes(), weights_file(tmp_path / "ck").read_bytes()
    assert plain == named  # the plain name tools expect holds the same weights
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
    assert config["format_version"] == 2 and config["package_version"]
    assert config["weights_file"] == f"model-{config['weights_sha256'][:16]}.safetensors"
    assert config["sde"] == {"type": "SubVPSDE", "params": SubVPSDE(beta_max=15.0).config()["params"]}
    assert config["network"]["class"] == "ScoreNet" and config["network"]["config"]["hidden"] == 16
    assert config["event_shape"] == [2] and config["dtype"] == "float32"
    assert config["options"]["ode_method"] == "rk4" and config["options"]["num_steps"] == 10
    raw = weights_file(tmp_path).read_bytes()
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


@pytest.mark.parametrize("source", ["saved", "moons"])
def test_trainable_load_fine_tunes(tmp_path, source):
    """load_checkpoint(trainable=True): the weights require gradients, log_prob's gradient reaches them and an Adam
    step changes them and the density (issue 11, item 9: shipped priors loaded frozen and SVI trained nothing)."""
    if source == "saved":
        tiny_prior().save_pretrained(tmp_path)
        source = tmp_path
    model, sde, event_shape, options = load_checkpoint(source, trainable=True)
    assert not model.training and all(p.requires_grad for p in model.parameters())
    prior = ScoreSDEPrior(model, sde, event_shape, **{**options, "rtol": 1e-3, "atol": 1e-3})
    x = datasets.load("moons", 4, seed=9)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        lp_before = prior.log_prob(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    (-prior.log_prob(x).mean()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True) if p.grad.any())
    with torch.no_grad():
        assert not torch.equal(prior.log_prob(x), lp_before)
    with pytest.raises(TypeError, match="trainable"):
        load_checkpoint(source, trainable="yes")


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
    # a GPU this machine lacks: torch's AssertionError ("not compiled with CUDA") became a ValueError (issue 11, 16)
    with pytest.raises(ValueError, match="map_location"):
        load_checkpoint(tmp_path, map_location="cuda:99" if torch.cuda.is_available() else "cuda")
    with pytest.raises(TypeError, match="map_location"):
        load_checkpoint(tmp_path, map_location=["cpu"])


# -- atomic saves ------------------------------------------------------------------------------
@pytest.mark.parametrize("failing", [("fsync", 1), ("replace", 1), ("fsync", 3), ("replace", 2)])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    """A failure at any step of a save (writing the weights, placing them, writing or placing config.json) leaves
    the previous checkpoint as it was, and no file behind."""
    old, new = tiny_prior(seed=0), tiny_prior(seed=1)
    target = tmp_path / "ck"
    old.save_pretrained(target)
    listing = sorted(os.listdir(target))
    x = torch.randn(5, 2)
    with torch.no_grad():
        expected = ScoreSDEPrior.from_pretrained(target).log_prob(x)
    name, at = failing
    real = getattr(os, name)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise OSError(f"{name} failed (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, broken)
    with pytest.raises(OSError, match="injected"):
        new.save_pretrained(target)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck"] and sorted(os.listdir(target)) == listing
    with torch.no_grad():
        assert torch.equal(ScoreSDEPrior.from_pretrained(target).log_prob(x), expected)
        new.save_pretrained(target)  # a successful save replaces it
        assert not torch.equal(ScoreSDEPrior.from_pretrained(target).log_prob(x), expected)


def test_saves_keep_the_new_and_the_previous_weights_only(tmp_path):
    """Each save writes a new weights file; the one it replaced stays (for a reader that read the previous config
    a moment ago), older ones go; saving the same weights again reuses the file."""
    target = tmp_path / "ck"
    names = []
    for seed in range(4):
        tiny_prior(seed=seed).save_pretrained(target)
        names.append(weights_file(target).name)
    assert len(set(names)) == 4
    assert sorted(os.listdir(target)) == sorted(["config.json", "model.safetensors", names[-2], names[-1]])
    tiny_prior(seed=3).save_pretrained(target)
    assert weights_file(target).name == names[-1]
    assert sorted(os.listdir(target)) == sorted(["config.json", "model.safetensors", names[-1]])


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
    weights_file(disguised).write_bytes(payload)
    edit_config(disguised, weights_sha256=None)
    with pytest.raises(CheckpointError, match=r"model-[0-9a-f]{16}\.safetensors"):
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
    weights = weights_file(saved)
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"\.safetensors.*(corrupted|SHA-256)"):
        load_checkpoint(saved)
    edit_config(saved, weights_sha256=None)  # without the checksum, the header check catches it
    with pytest.raises(CheckpointError, match=r"\.safetensors is not a valid safetensors file"):
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
    weights = str(weights_file(saved))
    tensors = safetensors.torch.load_file(weights)
    safetensors.torch.save_file({**tensors, "extra.weight": torch.zeros(3)}, weights)
    with pytest.raises(CheckpointError, match="unexpected keys extra.weight"):
        load_checkpoint(saved)
    tensors["backbone.out.bias"] = torch.full_like(tensors["backbone.out.bias"], float("nan"))
    safetensors.torch.save_file(tensors, weights)
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
    for name in ("config.json", weights_file(saved).name):
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
    weights_file(other).unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"model-[0-9a-f]{16}\.safetensors not found"):
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


# -- hostile files (issue 11, item 12) ---------------------------------------------------------------
def network_change(saved, **changes):
    config = json.loads((saved / "config.json").read_text())
    return {"network": {**config["network"], "config": {**config["network"]["config"], **changes}}}


@pytest.mark.parametrize(
    "change, match",
    [
        # would allocate 256 layers of 30000 x 30000 floats (1.8 TB) before the weights were looked at
        (lambda saved: network_change(saved, hidden=30000, num_layers=256), "does not match the architecture"),
        (lambda saved: network_change(saved, hidden=2**15, embed_dim=2**15), "does not match the architecture"),
        (lambda saved: network_change(saved, num_layers=10**5), "num_layers"),
        (lambda saved: network_change(saved, num_layers=10**9), "num_layers"),
        (lambda saved: network_change(saved, hidden=1e9), "hidden"),
        (lambda saved: network_change(saved, channels=[2**40]), "channels"),
        (lambda saved: {"event_shape": [10**12], "network": {"class": "ScoreNet", "config": {}}}, "event_shape"),
        (lambda saved: {"event_shape": [2**20, 2**20]}, "event_shape"),
        (lambda saved: {"event_shape": [1] * 100}, "event_shape"),
        (lambda saved: {"options": {"compile": "false"}}, "compile must be True or False"),
        (lambda saved: {"options": {"num_steps": 10**12}}, "num_steps"),
        (lambda saved: {"options": {"hutchinson_seed": 2**70}}, "hutchinson_seed"),
        (lambda saved: {"sde": {"type": "VPSDE", "params": {"T": 1e6}}}, "invalid SDE"),
        (lambda saved: {"sde": {"type": ["VPSDE"], "params": {}}}, "invalid SDE"),
        (lambda saved: {"sde": {"type": "VESDE", "params": [1, 2]}}, "invalid SDE"),
        (lambda saved: {"weights_file": "../../evil.safetensors"}, "weights_file"),
        (lambda saved: {"weights_file": None}, "weights_file"),
        (lambda saved: {"format_version": True}, "format_version"),
        (lambda saved: {"dtype": "x" * 10_000}, "unsupported dtype"),
    ],
)
def test_hostile_config_values_fail_fast_and_clearly(saved, change, match):
    """Each gives a CheckpointError naming config.json, without allocating what the config asks for."""
    edit_config(saved, **change(saved))
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(saved)
    assert "config.json" in str(info.value) and len(str(info.value)) < 2000


@pytest.mark.parametrize(
    "text, match",
    [
        ("[" * 100_000 + "]" * 100_000, "not valid JSON: RecursionError"),
        ('{"format": "pyro_scoreflow.checkpoint", "format_version": ' + "9" * 5000 + "}", "not valid JSON"),
        ("\xff\xfe{}", "not valid JSON"),
    ],
)
def test_unparsable_configs(saved, text, match):
    (saved / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(saved)


def test_oversized_config_is_refused_unread(saved):
    with open(saved / "config.json", "r+b") as f:
        f.truncate(5 * 2**30)  # a sparse 5 GB file: reading it would take seconds and gigabytes
    with pytest.raises(CheckpointError, match=r"config\.json is 5368709120 bytes; a config\.json holds at most"):
        load_checkpoint(saved)
    with pytest.raises(CheckpointError, match="bytes"):
        read_config(saved)


def test_hostile_safetensors_headers(saved):
    weights = weights_file(saved)
    raw = weights.read_bytes()
    edit_config(saved, weights_sha256=None)
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    cases = [
        ((2**62).to_bytes(8, "little") + raw[8:], "bad header length"),
        (raw[:8] + b"[" * header_len + raw[8 + header_len :], "header"),
        (raw + b"\0" * 64, "the header describes"),
    ]
    key = next(k for k in header if k != "__metadata__")
    for change in ({"shape": [10**9, 10**9]}, {"dtype": "I64"}):
        edited = json.dumps({**header, key: {**header[key], **change}}).encode()
        cases.append((len(edited).to_bytes(8, "little") + edited + raw[8 + header_len :], key.replace(".", r"\.")))
    for data, match in cases:
        weights.write_bytes(data)
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(saved)


# -- which checkpoint a name means (issue 11, item 14) -------------------------------------------------
def test_shipped_name_wins_over_a_local_folder_of_that_name(tmp_path, monkeypatch):
    """`mkdir moons && pyro-scoreflow demo` failed (or silently used the folder): a plain shipped name now always
    means the shipped prior, with a warning; the folder is reached as './moons' or Path('moons')."""
    monkeypatch.chdir(tmp_path)
    shipped_config = read_config(pretrained_path("moons"))
    (tmp_path / "moons").mkdir()  # an empty folder shadowed the shipped prior
    with pytest.warns(UserWarning, match=r"names the shipped prior.*'\./moons'"):
        model, *_ = load_checkpoint("moons")
    with pytest.warns(UserWarning, match="shipped prior"):
        assert read_config("moons") == shipped_config
    with pytest.raises(CheckpointNotFoundError):
        load_checkpoint("./moons")
    tiny_prior().save_pretrained(tmp_path / "moons")  # now a local checkpoint of that name
    for local in ("./moons", Path("moons"), tmp_path / "moons", os.path.join(".", "moons")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert read_config(local)["network"]["config"]["hidden"] == 16
    with pytest.warns(UserWarning, match="shipped prior"):
        assert read_config("moons")["network"]["config"]["hidden"] != 16
    with warnings.catch_warnings():  # no local folder of the name: no warning
        warnings.simplefilter("error")
        read_config("checkerboard")


# -- layouts and save targets ------------------------------------------------------------------------
def test_format_1_directories_load_and_migrate(tmp_path):
    """A directory written by earlier versions (config.json + model.safetensors, format 1), as the shipped priors
    are, loads; saving over it switches it to format 2 and removes the old weights file on the save after."""
    old = tmp_path / "old"
    shutil.copytree(pretrained_path("moons"), old)
    assert sorted(os.listdir(old)) == ["config.json", "model.safetensors"] and read_config(old)["format_version"] == 1
    x = datasets.load("moons", 3, seed=4)
    with torch.no_grad():
        expected = ScoreSDEPrior.from_pretrained("moons", rtol=1e-3, atol=1e-3).log_prob(x)
        assert torch.equal(ScoreSDEPrior.from_pretrained(old, rtol=1e-3, atol=1e-3).log_prob(x), expected)
    assert weights_file(old) == old / "model.safetensors"
    tiny_prior().save_pretrained(old)
    assert read_config(old)["format_version"] == 2
    assert sorted(os.listdir(old)) == sorted(["config.json", "model.safetensors", weights_file(old).name])
    tiny_prior(seed=1).save_pretrained(old)
    assert (old / "model.safetensors").read_bytes() == weights_file(old).read_bytes()  # the plain name follows
    load_checkpoint(old)


def test_save_targets(tmp_path):
    """Saving refuses a file, a folder of other files and a folder whose config.json is not a checkpoint's; an
    interrupted first save (only temporaries and weights files) can be saved over."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        tiny_prior().save_pretrained(tmp_path / "file")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "bert"}')
    (hf / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(CheckpointError, match="config.json that is not a readable pyro_scoreflow checkpoint"):
        tiny_prior().save_pretrained(hf)
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors"]
    only_weights = tmp_path / "only"
    only_weights.mkdir()
    (only_weights / "model.safetensors").write_bytes(b"somebody's weights")
    with pytest.raises(CheckpointError, match="non-empty directory without a checkpoint"):
        tiny_prior().save_pretrained(only_weights)
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / ".tmp-123-0123456789ab-config.json").write_text("{")
    (interrupted / "model-0123456789abcdef.safetensors").write_bytes(b"partial")
    tiny_prior().save_pretrained(interrupted)
    assert sorted(os.listdir(interrupted)) == sorted(
        ["config.json", "model.safetensors", weights_file(interrupted).name]
    )
    with pytest.raises(ValueError, match="invalid|must be"):
        save_checkpoint(tmp_path / "bad", tiny_prior().score_model, VPSDE(), (2,), {"rtol": -1.0})
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "event_shape, config",
    [((2,), {}), ((3,), {"num_classes": 4}), ((5,), {"context_dim": 3}),
     ((1, 8, 8), {"channels": [8, 16], "groups": 4}),
     ((3, 8, 8), {"channels": [8, 16, 32], "groups": 4, "num_classes": 2})],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_shapes_checked_before_building_are_the_networks(event_shape, config, dtype):
    """The tensors the loader expects (from a network with its parameters on the meta device) are exactly the state
    dict of the network it then builds, and computing them allocates no parameter memory."""
    sde = VPSDE()
    expected = C._expected_tensors(sde, torch.Size(event_shape), {**TINY, **config}, dtype, Path("config.json"))
    real = ScoreNet(sde, event_shape, **{**TINY, **config}).to(dtype).state_dict()
    assert expected == {k: (v.shape, v.dtype) for k, v in real.items()}
    with C._MetaParameters():
        huge = ScoreNet(sde, (2,), hidden=2**15, num_layers=256, embed_dim=2**15)  # 8e11 parameters
    assert all(p.is_meta for p in huge.parameters())


def test_leftovers_of_earlier_versions_saves_are_removed_when_stale(tmp_path):
    """Saves of earlier versions, killed midway, left '.NAME.tmp-<hex>' directories next to the checkpoint; a save
    removes those over an hour old (a younger one may belong to a save still running)."""
    stale, fresh = tmp_path / ".ck.tmp-0123456789ab", tmp_path / ".ck.tmp-ba9876543210"
    for leftover in (stale, fresh):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"\0" * 1000)
    hours_ago = os.stat(stale).st_mtime - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    other = tmp_path / ".ck.tmp-not-ours"
    other.mkdir()
    os.utime(other, (hours_ago, hours_ago))
    tiny_prior().save_pretrained(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path)) == sorted([".ck.tmp-ba9876543210", ".ck.tmp-not-ours", "ck"])

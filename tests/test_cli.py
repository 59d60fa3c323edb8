"""Entry scripts end on an input error (bad config, unusable checkpoint, missing file) with one line, exit 2."""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

import sample
import train
from models.checkpoint import CheckpointError, read_weights
from models.pipeline import StarPipeline
from tests.helpers import REPO
from tests.train_helpers import make_vqvae_dir, star_overrides
from utils import cli

CONFIG = REPO / "configs" / "shapes_vqvae.json"


def test_run_turns_input_errors_into_one_line_and_exit_2(capsys, monkeypatch):
    def fails(error):
        raise error
    assert cli.run(fails, CheckpointError("no checkpoint at x")) == 2
    assert capsys.readouterr().err == "error: no checkpoint at x\n"
    assert cli.run(fails, FileNotFoundError("LMDB directory not found: y")) == 2
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli.run(fails, ZeroDivisionError())
    monkeypatch.setenv("STAR_TRACEBACK", "1")
    with pytest.raises(CheckpointError):
        cli.run(fails, CheckpointError("x"))
    assert cli.run(lambda: None) == 0


@pytest.mark.parametrize("script, argv", [
    (sample.main, ["--prompt", "a red circle", "--out", "{file}"]),
    (train.main, ["train.py", f"--config={CONFIG}", "--loop.out_dir={file}", "--loop.steps=1"]),
])
def test_an_output_path_that_is_a_file_is_one_line(tmp_path, capsys, script, argv):
    """Was FileExistsError's traceback."""
    (tmp_path / "taken").write_text("")
    assert cli.run(script, [a.format(file=tmp_path / "taken") for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: [Errno 17] File exists") and str(tmp_path / "taken") in err and "Traceback" not in err


def test_sample_with_a_missing_checkpoint(tmp_path, capsys):
    argv = ["--ckpt", str(tmp_path / "missing"), "--prompt", "a red circle", "--out", str(tmp_path / "out")]
    assert cli.run(sample.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint at") and "Traceback" not in err


def test_official_file_without_preset_names_the_flag(tmp_path, capsys):
    path = tmp_path / "star.pth"
    torch.save({"x": torch.zeros(1)}, path)
    assert cli.run(sample.main, ["--ckpt", str(path), "--prompt", "a", "--out", str(tmp_path / "out")]) == 2
    assert "--preset" in capsys.readouterr().err


def test_train_config_errors(capsys):
    assert cli.run(train.main, ["train.py", f"--config={CONFIG}", "--loop.stpes=3"]) == 2
    assert "Did you mean 'steps'" in capsys.readouterr().err
    assert cli.run(train.main, ["train.py", f"--config={CONFIG}", "--vqvae.num_res_blocks=0"]) == 2
    assert "num_res_blocks must be >= 1" in capsys.readouterr().err


def test_a_transformer_that_does_not_fit_its_vqvae_names_the_flags(tmp_path, capsys):
    """Unchecked, a smaller vocabulary ended in cross-entropy's 'Target 394 is out of bounds' and other code
    vectors in a matmul shape error, each after the data and text encoder had been set up."""
    args = star_overrides(tmp_path / "run", make_vqvae_dir(tmp_path / "vqvae"), **{"model.vocab_size": 32,
                                                                                    "model.z_channels": 4})
    assert cli.run(train.main, ["train.py", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the transformer does not fit the VQ-VAE") and err.count("\n") == 1
    assert "set --model.vocab_size=64 --model.z_channels=8" in err


def test_train_prints_the_resolved_config(capsys):
    with pytest.raises(SystemExit) as done:
        train.main(["train.py", f"--config={CONFIG}", "--loop.steps=7", "--print-config"])
    assert done.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["loop"]["steps"] == 7 and printed["stage"] == json.loads(CONFIG.read_text())["stage"]
    assert "eval_every" in printed["loop"] and "depth" in printed["model"]  # defaults included


def test_train_config_path_with_a_space(capsys):
    """``--config PATH`` reads the file like ``--config=PATH`` (here: the same override error, not 'config')."""
    assert cli.run(train.main, ["train.py", "--config", str(CONFIG), "--loop.stpes", "3"]) == 2
    assert "Did you mean 'steps'" in capsys.readouterr().err
    assert cli.run(train.main, ["train.py", "--config", "--loop.steps=3"]) == 2
    assert "--config needs a path" in capsys.readouterr().err


def test_truncated_or_foreign_weight_files(tmp_path):
    pipe_dir = StarPipeline.tiny_random().save_pretrained(tmp_path / "pipe")
    weights = tmp_path / "pipe" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # a copy cut short
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors"):
        StarPipeline.from_pretrained(pipe_dir)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all\n" * 10)
    with pytest.raises(CheckpointError, match="cannot read") as info:
        read_weights(garbage)
    assert "weights_only=False" not in str(info.value)  # never advise running a file's code


@pytest.mark.parametrize("guidance, message", [
    ("ramp", "unknown guidance schedule 'ramp'"),
    ("window:2:1", "the window needs 0 <= i <= j <= 3 (this model has 4 scales)"),  # guided nothing, silently
    ("window:0:9", "the window needs 0 <= i <= j <= 3"),
    ("0,1,2", "explicit guidance list needs 4 values (one per scale), got 3"),
    ("0,1,x,2", "numbers separated by commas"),
])
def test_bad_sampling_flag_is_an_input_error(tmp_path, capsys, monkeypatch, guidance, message):
    """Checked when the settings are resolved, before any prompt is encoded or item file looked at."""
    monkeypatch.setattr(StarPipeline, "__call__", lambda *a, **kw: pytest.fail("generation started"))
    (tmp_path / "000000.json").write_text("{}")  # an item already done: the flag must be checked all the same
    argv = ["--prompt", "a red circle", "--guidance", guidance, "--out", str(tmp_path)]  # embedded tiny model
    assert cli.run(sample.main, argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, "--edit-image: no such file"),
    (b"not a png", "--edit-image: not a readable image"),
])
def test_an_unreadable_edit_image_is_refused_before_the_model_loads(tmp_path, capsys, content, message):
    """Was PIL's traceback (UnidentifiedImageError) after the pipeline had loaded."""
    image = tmp_path / "in.png"
    if content is not None:
        image.write_bytes(content)
    argv = ["--ckpt", str(tmp_path / "missing"), "--prompt", "a red circle", "--edit-image", str(image),
            "--edit-mask", str(image), "--out", str(tmp_path / "out")]  # the missing --ckpt would fail later
    assert cli.run(sample.main, argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a red circle", "seed": "x7"}', "2: 'seed' must be an integer, got 'x7'"),  # was a traceback
    ('{"prompt": "a red circle", "seed": 1.5}', "'seed' must be an integer, got 1.5"),       # was truncated to 1
    ('{"prompt": 3}', "2: each line needs a JSON object with a 'prompt' string"),
])
def test_bad_prompt_file_lines_name_the_line(tmp_path, capsys, line, message):
    prompts = tmp_path / "items.jsonl"
    prompts.write_text('{"prompt": "a blue square"}\n' + line + "\n")
    assert cli.run(sample.main, ["--prompts", str(prompts), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_guidance_schedules_against_their_definitions():
    from models.sampling import guidance_weights
    assert guidance_weights("linear", 3.0, 4) == [0.0, 1.0, 2.0, 3.0]
    assert guidance_weights("constant", 0.5, 3) == [0.5, 0.5, 0.5]
    assert guidance_weights("window:1:2", 4.0, 4) == [0.0, 4.0, 4.0, 0.0]
    assert guidance_weights("window:3:3", 4.0, 4) == [0.0, 0.0, 0.0, 4.0]
    assert guidance_weights("0,0.5,1.5", 9.0, 3) == [0.0, 0.5, 1.5]  # cfg is unused by an explicit list
    assert guidance_weights([1, 2], 9.0, 2) == [1.0, 2.0]


def test_training_guidance_window_is_checked_against_the_model_scales():
    from trainer.config import RunConfig
    from utils.config import ConfigError, load_config
    base = ["--star_train.vqvae=v", "--model.patch_nums=[1,2,3]", "--vqvae.patch_nums=[1,2,3]"]
    assert load_config(RunConfig, None, base + ["--star_train.sample_guidance=window:1:2"])
    with pytest.raises(ConfigError, match=r"star_train.sample_guidance: guidance 'window:1:5'"):
        load_config(RunConfig, None, base + ["--star_train.sample_guidance=window:1:5"])
    assert load_config(RunConfig, None, ["--stage=vqvae", "--star_train.sample_guidance=window:1:5"])  # unused


ENTRY_SCRIPTS = ["train.py", "train_sampler.py", "sample.py", "demo_gradio.py", "test_pack.py",
                 *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "scripts").glob("*.py"))]


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_every_entry_script_answers_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(REPO / script), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert exit_info.value.code in (0, None)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 3
    assert any(Path(script).name in line for line in lines[:5]), "the help shows another script's usage"


def test_bad_prompt_files_are_input_errors(tmp_path, capsys):
    bad = tmp_path / "items.jsonl"
    bad.write_text('{"prompt": "a red circle"}\n{"seed": 3}\n')
    for prompts, message in ((bad, f"{bad}:2: each line needs a JSON object with a 'prompt'"),
                             (tmp_path / "missing.txt", "prompt file not found")):
        assert cli.run(sample.main, ["--prompts", str(prompts), "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("device, expected", [("cdu", "is not a device"), ("cuda:64", "CUDA")])
def test_device_flags_are_checked_before_anything_loads(device, expected, monkeypatch, capsys):
    """``--device`` names a device this machine has, or argparse stops with one line (exit 2)."""
    monkeypatch.setattr(sys, "argv", ["sample.py", "--prompt", "a", "--out", "unused", "--device", device])
    with pytest.raises(SystemExit) as stop:
        sample.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device" in err and expected in err and "Traceback" not in err
    assert cli.device_arg("cpu") == "cpu"


@pytest.mark.parametrize("flag, value, expected", [("--num-images", "0", "must be at least 1, got 0"),
                                                   ("--batch-size", "two", "'two' is not an integer")])
def test_counts_must_be_positive_integers(flag, value, expected, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sample.py", "--prompt", "a", "--out", "unused", flag, value])
    with pytest.raises(SystemExit) as stop:
        sample.main()
    assert stop.value.code == 2 and f"argument {flag}: {expected}" in capsys.readouterr().err
    assert cli.positive_int("3") == 3


def test_weights_of_another_architecture_are_one_line_naming_the_file(tmp_path, capsys):
    """A config.json edited (or a safetensors file copied) out of step with the weights was a RuntimeError
    listing every tensor; as --loop.init_from of a VQ-VAE run it was a traceback at start-up."""
    from models.checkpoint import load_pretrained_vqvae
    vqvae_dir = make_vqvae_dir(tmp_path / "vqvae")
    with pytest.raises(CheckpointError, match=r"vqvae.safetensors does not fit this VQVAE \(size mismatch for"):
        load_pretrained_vqvae(_with_config(vqvae_dir, tmp_path / "edited", {"ch": 64}))
    argv = ["train.py", f"--config={CONFIG}", f"--loop.init_from={vqvae_dir}", f"--loop.out_dir={tmp_path / 'run'}"]
    assert cli.run(train.main, argv) == 2  # the shapes config's VQ-VAE is larger than the tiny one saved here
    err = capsys.readouterr().err
    assert f"error: {vqvae_dir} does not fit this VQVAE" in err and err.count("\n") == 1


def _with_config(directory, copy, vqvae_changes: dict):
    """A copy of a checkpoint directory whose config.json's vqvae section has ``vqvae_changes``."""
    import shutil
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    config["vqvae"].update(vqvae_changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_star_training_before_its_vqvae_exists_says_what_to_train(tmp_path, capsys):
    """The README's second command run before the first: it was 'checkpoint not found: outputs/...'."""
    argv = ["train.py", f"--config={REPO / 'configs' / 'shapes_star.json'}", f"--loop.out_dir={tmp_path / 'run'}",
            f"--star_train.vqvae={tmp_path / 'vqvae' / 'final'}"]
    assert cli.run(train.main, argv) == 2
    err = capsys.readouterr().err
    assert f"star_train.vqvae={tmp_path / 'vqvae' / 'final'} not found: train the VQ-VAE first" in err
    assert err.count("\n") == 1


def test_a_vqvae_directory_given_as_the_pipeline_says_what_it_is(tmp_path, capsys):
    argv = ["--ckpt", str(make_vqvae_dir(tmp_path / "vqvae")), "--prompt", "a red circle", "--out", str(tmp_path)]
    assert cli.run(sample.main, argv) == 2
    assert "has no 'star' section: it holds a VQ-VAE only" in capsys.readouterr().err


@pytest.mark.parametrize("kind, message", [
    ("missing", "checkpoint not found"),
    ("garbage", "cannot read"),                                          # was torch.load's traceback
    ("export", "is not a training checkpoint (a run's <loop.out_dir>/ckpt-*.pt; it lacks model, optimizer"),
])
def test_an_unusable_loop_resume_file_is_one_line(tmp_path, capsys, kind, message):
    path = {"missing": tmp_path / "nothing.pt", "garbage": tmp_path / "garbage.pt",
            "export": make_vqvae_dir(tmp_path / "vqvae") / "vqvae.safetensors"}[kind]
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint")
    argv = ["train.py", f"--config={CONFIG}", f"--loop.resume={path}", f"--loop.out_dir={tmp_path / 'run'}"]
    assert cli.run(train.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv", [["--prompt", "a", "--seed", str(2 ** 64)], ["--prompts", "items.jsonl"]])
def test_a_seed_torch_cannot_take_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, argv):
    """torch's 'Overflow when unpacking long long' came as a traceback once the model had loaded."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "items.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "seed": -9223372036854775809}\n')
    monkeypatch.setattr(sample, "load_pipeline", lambda args: pytest.fail("the model loaded"))
    assert cli.run(sample.main, argv + ["--out", str(tmp_path / "out")]) == 2
    assert "is out of range: seeds lie in [-2**63, 2**64)" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["prompts.txt", "items.jsonl"])
def test_an_empty_prompt_file_is_an_error(tmp_path, capsys, name):
    """It was a run that generated 0 items and exited 0."""
    (tmp_path / name).write_text("\n  \n")
    assert cli.run(sample.main, ["--prompts", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
    assert f"no prompts in {tmp_path / name}" in capsys.readouterr().err

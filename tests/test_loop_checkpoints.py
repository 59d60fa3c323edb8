"""Checkpoints by time (loop.ckpt_every_minutes), and resuming with other settings: a warning that lists them, or
a clear error when the model no longer fits."""
from tests.train_helpers import history, make_vqvae_dir, run_train, star_overrides, vqvae_overrides
from utils.config import config_changes
from utils.data.pack import shapes_items


def test_config_changes_lists_every_differing_setting():
    old = {"model": {"depth": 2, "width": 64}, "optim": {"lr": 0.003}, "stage": "star"}
    new = {"model": {"depth": 3, "width": 64}, "optim": {"lr": 0.003, "fused": True}, "stage": "star"}
    assert config_changes(old, new) == ["model.depth: 2 -> 3", "optim.fused: '<missing>' -> True"]
    assert config_changes(new, new) == []


def test_resume_names_changed_settings_and_refuses_another_architecture(tmp_path):
    vqvae_dir = make_vqvae_dir(tmp_path / "vqvae")
    first = run_train(star_overrides(tmp_path / "run", vqvae_dir, 3))
    assert first.returncode == 0, first.stderr[-3000:]
    deeper = run_train(star_overrides(tmp_path / "run", vqvae_dir, 6, **{"model.depth": 3}))
    assert deeper.returncode == 2 and "Traceback" not in deeper.stderr, deeper.stderr[-3000:]
    assert "ckpt-00000003.pt does not fit this model" in deeper.stderr and "model.depth: 2 -> 3" in deeper.stderr
    slower = run_train(star_overrides(tmp_path / "run", vqvae_dir, 6, **{"optim.lr": 1e-3}))
    assert slower.returncode == 0, slower.stderr[-3000:]
    assert "resuming with settings changed since the checkpoint: loop.steps: 3 -> 6; optim.lr: 0.003 -> 0.001" \
        in slower.stderr
    # A STAR command pointed at a VQ-VAE run's folder: the stage is named, not thirty changed settings
    vq_run = run_train(vqvae_overrides(**{"loop.steps": 1, "loop.ckpt_every": 1, "loop.out_dir": tmp_path / "vq"}))
    assert vq_run.returncode == 0, vq_run.stderr[-3000:]
    mixed = run_train(star_overrides(tmp_path / "vq", vqvae_dir, 3))
    assert mixed.returncode == 2 and "Traceback" not in mixed.stderr, mixed.stderr[-3000:]
    assert "ckpt-00000001.pt is a checkpoint of a 'vqvae' run, not 'star'" in mixed.stderr


def test_resume_on_a_data_set_of_another_size_says_so(tmp_path):
    """Shards added to or removed from the same folders change no setting, but they change the epoch order. A
    finished run started again says that it is complete."""
    from utils.data.pack import PackOptions, pack
    pack(shapes_items(48), tmp_path / "data", PackOptions(shard_size=16))
    args = vqvae_overrides(**{"data.source": "lmdb", "data.lmdb_dirs": str(tmp_path / "data"), "loop.steps": 2,
                              "loop.ckpt_every": 1, "loop.out_dir": str(tmp_path / "run")})
    first = run_train(args)
    assert first.returncode == 0 and "the data set has" not in first.stderr, first.stderr[-3000:]
    (tmp_path / "data" / "shard-00002.done.json").unlink()  # an incomplete shard is not read
    again = run_train(args)  # the same command, a third fewer records
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the data set has 32 records, the checkpoint's run had 48" in again.stderr
    assert "the run is complete (loop.steps=2)" in again.stderr


def test_checkpoints_by_time_as_well_as_by_steps(tmp_path):
    vqvae_dir = make_vqvae_dir(tmp_path / "vqvae")
    # every 1 ms: a checkpoint after every step (the periodic one would come at step 100 only)
    run = run_train(star_overrides(tmp_path / "run", vqvae_dir, 5, **{"loop.ckpt_every": 100,
                                                                       "loop.ckpt_every_minutes": 1 / 60000}))
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*.pt")) == [f"ckpt-0000000{s}.pt" for s in range(1, 6)]
    assert [row["step"] for row in history(tmp_path / "run")] == [1, 2, 3, 4, 5]


def test_training_on_records_smaller_than_the_resolution_warns(tmp_path):
    """Images packed at 8 px trained at 16 px are upscaled: said once at the start, naming the fix."""
    from utils.data.pack import PackOptions, pack
    pack(shapes_items(16, size=8), tmp_path / "data", PackOptions())
    run = run_train(vqvae_overrides(**{"data.source": "lmdb", "data.lmdb_dirs": str(tmp_path / "data"),
                                       "vqvae.ch_mult": "[1,2,2]", "loop.steps": 1, "loop.out_dir": tmp_path / "r"}))
    assert run.returncode == 0, run.stderr[-3000:]
    assert ("16 of 16 records in data.lmdb_dirs have a shorter side below the training resolution (16 px) and are "
            "upscaled to it: pack larger images, or leave them out with --data.min_side=16") in run.stderr
    assert "upscaled" in (tmp_path / "r" / "train.log").read_text()

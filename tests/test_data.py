import json
import math
import pickle
import subprocess
import sys

import lmdb
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests.helpers import REPO
from utils.data.dataset import DistributedResumableSampler, ImageTransform, LMDBImageTextDataset, ShapesDataset
from utils.data.pack import PackOptions, folder_items, manifest_items, official_items, pack
from utils.data.records import encode_record, record_key


def _image(path, size=(80, 60), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def photo_folder(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(5):
        _image(root / f"ok{i}.png", color=(40 * i, 100, 200))
        (root / f"ok{i}.txt").write_text(f"photo number {i}")
    _image(root / "json_caption.jpg")
    (root / "json_caption.json").write_text(json.dumps({"caption": "from json", "prompt": "second caption"}))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "corrupt.txt").write_text("a corrupt image")
    _image(root / "nocaption.png")
    _image(root / "tiny.png", size=(8, 8))
    (root / "tiny.txt").write_text("too small")
    return root


def test_pack_folder_counts_and_dataset(photo_folder, tmp_path):
    summary = pack(folder_items(photo_folder), tmp_path / "out", PackOptions(shard_size=3, min_side=32))
    assert summary["packed"] == 6
    assert summary["skipped"] == {"unreadable image": 1, "missing caption": 1, "too small": 1}
    ds = LMDBImageTextDataset([tmp_path / "out"], ImageTransform(32))
    assert len(ds) == 6 and ds.upscaled == 0
    assert LMDBImageTextDataset([tmp_path / "out"], ImageTransform(64)).upscaled == 6  # 80x60 images
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    captions = {ds[i]["caption"] for i in range(len(ds))}
    assert {"photo number 0", "photo number 4"} <= captions
    assert sorted(summary["skipped_items"]) == [["corrupt.png", "unreadable image"],
                                                ["nocaption.png", "missing caption"], ["tiny.png", "too small"]]
    # re-running reuses finished shards, and still names what they skipped
    again = pack(folder_items(photo_folder), tmp_path / "out", PackOptions(shard_size=3, min_side=32))
    assert again["shards_written"] == 0 and again["shards_reused"] == 3 and again["packed"] == 6
    assert sorted(again["skipped_items"]) == sorted(summary["skipped_items"]) and again["inputs_written"] == 0


def test_test_pack_names_the_skipped_inputs(photo_folder, tmp_path, monkeypatch, capsys):
    import test_pack
    from utils import cli
    monkeypatch.setattr(test_pack, "SHOWN_SKIPPED", 2)
    argv = ["test_pack.py", "--folder", str(photo_folder), "--min-side", "32", "--out", str(tmp_path / "out")]
    for run in range(2):  # the second run reuses the shard: no speed to report
        monkeypatch.setattr(sys, "argv", argv)
        assert cli.run(test_pack.main) == 0
        out, err = capsys.readouterr()
        assert "skipped corrupt.png: unreadable image" in err and "skipped nocaption.png: missing caption" in err
        assert "... and 1 more skipped" in err and "tiny.png" not in err
        summary = json.loads(out.strip().splitlines()[-1])
        assert "skipped_items" not in summary
        assert (summary["images_per_s"] is None) == (run == 1)


def test_two_data_sets_over_the_same_shards_both_read_them(photo_folder, tmp_path):
    """LMDB opens a path once per process: the second data set (validation data that is the training data, a
    notebook building one twice) used to find every record 'unreadable' and end in 'no readable record'."""
    pack(folder_items(photo_folder), tmp_path / "out", PackOptions(shard_size=4))
    train = LMDBImageTextDataset([tmp_path / "out"], ImageTransform(16))
    val = LMDBImageTextDataset([tmp_path / "out"], ImageTransform(16))
    for i in range(len(train)):
        a, b = train[i], val[i]
        assert a["record"] == b["record"] == i and torch.equal(a["image"], b["image"])
    assert train.skipped == val.skipped == 0


def test_more_shards_than_the_process_may_open_files_are_all_read(tmp_path):
    """Every shard kept its LMDB file open: past the open-files limit (ulimit -n) every read failed and the rest of
    the data set was skipped as unreadable. Here: 300 one-record shards under a limit of 128 files."""
    from utils.data.pack import shapes_items
    pack(shapes_items(300, size=8), tmp_path / "data", PackOptions(shard_size=1))
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit("
              "resource.RLIMIT_NOFILE)[1])); from utils.data.dataset import ImageTransform, LMDBImageTextDataset; "
              "from utils.data import records; ds = LMDBImageTextDataset([sys.argv[1]], ImageTransform(8)); "
              "keys = [ds[i]['key'] for i in range(len(ds))] + [ds[i]['key'] for i in range(len(ds))]; "
              "print(len(ds), len(set(keys)), ds.skipped, len(next(iter(records._SHARED_ENVS.values()))))")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "data")], cwd=REPO, capture_output=True,
                         text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["300", "300", "0", "32"]  # all read, none skipped, at most 128 / 4 envs open


def test_a_shard_larger_than_its_initial_map_is_packed_whole(tmp_path):
    """The map was fixed (64 GB a shard, no flag): a shard of larger images ended the pack in MapFullError."""
    from utils.data.pack import shapes_items
    small = pack(shapes_items(40), tmp_path / "small", PackOptions(shard_size=25, map_size_gb=2 ** -16))  # 16 KiB
    usual = pack(shapes_items(40), tmp_path / "usual", PackOptions(shard_size=25))
    assert small["packed"] == usual["packed"] == 40 and small["shards_written"] == 2
    a, b = (LMDBImageTextDataset([tmp_path / d], ImageTransform(64)) for d in ("small", "usual"))
    assert all(torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"] for i in range(40))


def test_records_of_two_folders_with_the_same_file_names_stay_distinct(tmp_path):
    # Two photo folders packed separately both hold "a.png": the items' source ids collide, their record numbers
    # (what the token cache keys on) must not, or a cache would serve one image's tokens for the other.
    for name, color in (("one", (250, 0, 0)), ("two", (0, 0, 250))):
        (tmp_path / name).mkdir()
        _image(tmp_path / name / "a.png", color=color)
        (tmp_path / name / "a.txt").write_text(f"photo from {name}")
        pack(folder_items(tmp_path / name), tmp_path / f"packed_{name}", PackOptions())
    ds = LMDBImageTextDataset([tmp_path / "packed_one", tmp_path / "packed_two"], ImageTransform(32))
    items = [ds[0], ds[1]]
    assert items[0]["key"] == items[1]["key"] == "a.png"
    assert items[0]["record"] != items[1]["record"]
    assert items[0]["image"][0].mean() > 0.9 and items[1]["image"][2].mean() > 0.9  # red, then blue


def test_manifest_jsonl_and_csv(tmp_path):
    for i in range(3):
        _image(tmp_path / f"m{i}.png")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"image": f"m{i}.png", "caption": f"c{i}", "alt": f"a{i}"})
                                                 for i in range(3)))
    rows = "\n".join(f"m{i}.png,c{i}" for i in range(3))
    (tmp_path / "m.csv").write_text("image,caption\n" + rows + "\nmissing.png,x\n")
    s1 = pack(manifest_items(tmp_path / "m.jsonl", ("caption", "alt")), tmp_path / "o1", PackOptions())
    s2 = pack(manifest_items(tmp_path / "m.csv"), tmp_path / "o2", PackOptions(max_side=40))
    assert s1["packed"] == 3 and s2["packed"] == 3 and s2["skipped"] == {"missing image": 1}
    ds = LMDBImageTextDataset([tmp_path / "o1"], ImageTransform(16), caption_keys=("alt",))
    assert ds[1]["caption"].startswith("a")
    assert LMDBImageTextDataset([tmp_path / "o2"], ImageTransform(16)).shards[0].sizes[0].tolist() == [40, 30]


def test_official_json_layout_packs(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "jsons").mkdir()
    for i in range(3):
        _image(tmp_path / "images" / f"{i}.webp")
        (tmp_path / "jsons" / f"{i}.json").write_text(json.dumps({"id": f"x{i}", "prompt": f"prompt {i}"}))
    summary = pack(official_items(tmp_path), tmp_path / "out", PackOptions())
    assert summary["packed"] == 3


BAD_JSON = {"a list": b"[1, 2]", "not UTF-8": b"\xff\xfe\x00 garbage", "truncated": b'{"caption": '}


def test_malformed_caption_files_and_manifest_rows_are_skipped_and_named(tmp_path):
    """A sidecar or official .json that is a list, not UTF-8 or truncated used to end the whole pack in an
    AttributeError / UnicodeDecodeError (or count as a 'missing caption'); a bad JSONL line ended it too."""
    folder, official = tmp_path / "folder", tmp_path / "official"
    for d in (folder, official / "images", official / "jsons"):
        d.mkdir(parents=True)
    for i, content in enumerate(BAD_JSON.values()):
        _image(folder / f"bad{i}.png")
        (folder / f"bad{i}.json").write_bytes(content)
        (official / "jsons" / f"bad{i}.json").write_bytes(content)
        _image(official / "images" / f"bad{i}.png")
    _image(folder / "good.png")
    (folder / "good.json").write_text(json.dumps({"caption": " a red box "}))
    _image(official / "images" / "good.png")
    (official / "jsons" / "good.json").write_text(json.dumps({"basename": ["not", "a", "name"], "prompt": "ok"}))
    unreadable = sorted([f"bad{i}{ext}", "unreadable caption file"] for i in range(3) for ext in (".png", ""))
    s1 = pack(folder_items(folder), tmp_path / "o1", PackOptions())
    s2 = pack(official_items(official), tmp_path / "o2", PackOptions())
    assert s1["packed"] == 1 and s2["packed"] == 1
    assert sorted(s1["skipped_items"] + s2["skipped_items"]) == unreadable
    assert LMDBImageTextDataset([tmp_path / "o1"], ImageTransform(16))[0]["caption"] == "a red box"
    _image(tmp_path / "m0.png")
    (tmp_path / "m.jsonl").write_bytes(b'[1]\n{"image": "m0.png", "caption": "fine"}\n{"image": \n\xff\n')
    s3 = pack(manifest_items(tmp_path / "m.jsonl"), tmp_path / "o3", PackOptions())
    assert s3["packed"] == 1 and s3["skipped"] == {"unreadable manifest row": 3}
    assert sorted(k for k, _ in s3["skipped_items"]) == ["m-0", "m-2", "m-3"]


def test_reader_for_official_packs(tmp_path):
    """A pack built the official way: pickled keys/values, __keys__, <name>-info.json, <name>-lock."""
    name = tmp_path / "MJData-abc123"
    env = lmdb.open(str(name), subdir=False, map_size=2 ** 24)
    keys, info = [], {}
    with env.begin(write=True) as txn:
        for i in range(4):
            key = f"MJData-{i}"
            buf = __import__("io").BytesIO()
            Image.new("RGB", (64, 48), (i * 50, 0, 0)).save(buf, format="PNG")
            txn.put(pickle.dumps(key), pickle.dumps(buf.getvalue()))
            keys.append(key)
            info[key] = {"id": str(i), "prompt": f"official prompt {i}", "height": 48, "width": 64}
        txn.put(pickle.dumps("__keys__"), pickle.dumps(keys))
    env.close()
    (tmp_path / "MJData-abc123-info.json").write_text(json.dumps(info))
    ds = LMDBImageTextDataset([tmp_path], ImageTransform(32))
    assert len(ds) == 4 and ds.shards[0].official
    assert [ds[i]["caption"] for i in range(4)] == [f"official prompt {i}" for i in range(4)]
    assert ds[2]["image"].shape == (3, 32, 32)


def test_corrupt_record_is_skipped_and_counted(photo_folder, tmp_path):
    pack(folder_items(photo_folder), tmp_path / "out", PackOptions(shard_size=100))
    env = lmdb.open(str(tmp_path / "out" / "shard-00000"), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(record_key(1), encode_record({"key": "bad", "captions": {"caption": "x"}}, b"garbage"))
    env.close()
    ds = LMDBImageTextDataset([tmp_path / "out"], ImageTransform(16))
    item = ds[1]
    assert ds.skipped == 1 and item["key"] != "bad"


def test_training_logs_the_skipped_records_of_all_ranks_across_resume(tmp_path):
    from tests.train_helpers import history, run_train, vqvae_overrides
    from utils.data.pack import shapes_items
    pack(shapes_items(8, size=16), tmp_path / "data", PackOptions(shard_size=100))
    env = lmdb.open(str(tmp_path / "data" / "shard-00000"), subdir=True)
    with env.begin(write=True) as txn:  # records 2 and 3 unreadable: each step (one batch = all 8) meets both
        for i in (2, 3):
            txn.put(record_key(i), encode_record({"key": f"bad{i}", "captions": {"caption": "x"}}, b"garbage"))
    env.close()
    args = vqvae_overrides(**{"data.source": "lmdb", "data.lmdb_dirs": f"[\"{tmp_path / 'data'}\"]",
                              "loop.log_every": 1, "loop.ckpt_every": 2, "loop.out_dir": tmp_path / "run"})
    first = run_train(args + ["--loop.steps=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "skipping unreadable record 2" in first.stderr
    second = run_train(args + ["--loop.steps=4"], torchrun=2)  # resumes from step 2; ranks' counts are summed
    assert second.returncode == 0, second.stderr[-3000:]
    assert "checkpoint written by 1 rank(s), resuming on 2" in second.stderr
    assert [(r["step"], r["skipped_records"]) for r in history(tmp_path / "run")] == [(1, 2), (2, 4), (3, 6), (4, 8)]
    assert (tmp_path / "run" / "train.log").read_text().rstrip().endswith("; 8 unreadable records skipped")


def test_sampler_gives_disjoint_complete_coverage_for_two_ranks():
    n = 103
    parts = [DistributedResumableSampler(n, rank=r, world=2, seed=3) for r in range(2)]
    for s in parts:
        s.set_epoch(5)
    a, b = (p.indices() for p in parts)
    assert len(a) == len(b) == 52
    assert set(a) | set(b) == set(range(n))
    assert len(set(a) & set(b)) <= 1  # only the single wrap-around padding index may repeat
    parts[0].set_epoch(6)
    assert parts[0].indices() != a  # a new epoch, a new order
    parts[0].set_epoch(5, start=10)
    assert list(parts[0]) == a[10:] and len(parts[0]) == 42


@pytest.mark.parametrize("size, world", [(3, 8), (1, 4), (5, 5), (7, 3)])
def test_sampler_gives_every_rank_the_same_count_even_with_more_ranks_than_items(size, world):
    """With fewer items than ranks the padding used to wrap once only: ranks 3-7 of 8 got no index at all."""
    shares = [DistributedResumableSampler(size, rank=r, world=world, seed=1).indices() for r in range(world)]
    assert [len(s) for s in shares] == [math.ceil(size / world)] * world
    assert set().union(*shares) == set(range(size))


def test_item_randomness_is_keyed_by_epoch_and_index():
    ds = ShapesDataset(50, ImageTransform(32, random_crop=0.2, hflip=True), caption_dropout=0.5, seed=1)
    first = [ds[i]["caption"] for i in range(20)]
    assert "" in first and any(first)
    assert [ds[i]["caption"] for i in range(20)] == first
    ds.set_epoch(1)
    assert [ds[i]["caption"] for i in range(20)] != first


def test_dataloader_with_two_workers(tmp_path):
    pack(__import__("utils.data.pack", fromlist=["shapes_items"]).shapes_items(40, size=32), tmp_path / "s",
         PackOptions(shard_size=16))
    ds = LMDBImageTextDataset([tmp_path / "s"], ImageTransform(32))
    batches = list(DataLoader(ds, batch_size=8, num_workers=2))
    assert sum(len(b["caption"]) for b in batches) == 40
    assert torch.equal(batches[0]["image"][0], ds[0]["image"])


def test_test_pack_cli_prints_summary(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "test_pack.py"), "--shapes", "20", "--out", str(tmp_path / "o"),
                           "--shard-size", "8", "--workers", "2"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["packed"] == 20 and summary["shards_written"] == 3


def test_a_rerun_reuses_shards_only_if_it_would_write_the_same(tmp_path):
    """Re-running with other options (or other items in a shard) used to reuse the old shards silently."""
    from utils.cli import InputError
    from utils.data.pack import shapes_items
    out, opts = tmp_path / "o", PackOptions(shard_size=8)
    assert pack(shapes_items(20, size=32), out, opts)["shards_written"] == 3
    again = pack(shapes_items(20, size=32), out, opts)
    assert (again["shards_reused"], again["shards_written"], again["packed"]) == (3, 0, 20)
    with pytest.raises(InputError, match=r"shard-00000 from another packing run \(max_side: 0 -> 16\)"):
        pack(shapes_items(20, size=32), out, PackOptions(shard_size=8, max_side=16))
    with pytest.raises(InputError, match=r"shard-00000 from another packing run \(its items"):
        pack(shapes_items(20, size=48), out, opts)  # the shapes size is an item parameter
    done = out / "shard-00000.done.json"  # written before fingerprints existed: reused as it is
    done.write_text(json.dumps({k: v for k, v in json.loads(done.read_text()).items() if k != "fingerprint"}))
    with pytest.raises(InputError, match="shard-00001 from another packing run"):
        pack(shapes_items(20, size=48), out, opts)


@pytest.mark.parametrize("source, expected", [
    (["--folder", "{tmp}/missing"], "no such folder"),
    (["--manifest", "{tmp}/missing.jsonl"], "no such file"),
    (["--folder", "{tmp}/empty"], "nothing to pack in"),
    (["--official", "{tmp}/empty"], "expected jsons/*.json records"),
])
def test_test_pack_refuses_a_wrong_source(tmp_path, monkeypatch, capsys, source, expected):
    """A mistyped path or an empty folder is an error (exit 2, one line), not a successful pack of 0 images."""
    import test_pack
    from utils import cli
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path) for a in source]
    monkeypatch.setattr(sys, "argv", ["test_pack.py", *argv, "--out", str(tmp_path / "out")])
    assert cli.run(test_pack.main) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and expected in err, err


def test_test_pack_fails_when_every_input_is_skipped(photo_folder, tmp_path, monkeypatch, capsys):
    """--min-side above every image packed nothing and exited 0, as if the data were ready."""
    import test_pack
    from utils import cli
    argv = ["test_pack.py", "--folder", str(photo_folder), "--min-side", "100000", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    assert cli.run(test_pack.main) == 2
    err = capsys.readouterr().err
    assert "error: every input was skipped (" in err and "'too small': 7" in err


@pytest.mark.parametrize("flag", [["--shapes-size", "0"], ["--shapes-texture", "1.5"], ["--max-side", "-1"]])
def test_test_pack_refuses_bad_numbers_before_packing(tmp_path, monkeypatch, capsys, flag):
    """--shapes-size 0 'packed' 0 images as unreadable and exited 0; the others were accepted."""
    import test_pack
    monkeypatch.setattr(sys, "argv", ["test_pack.py", "--shapes", "3", *flag, "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as info:
        test_pack.main()
    assert info.value.code == 2 and f"argument {flag[0]}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

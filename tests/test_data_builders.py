"""The TFDS builders on fixture trees written here (both layouts), and digits_drift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import data
from data.build import build
from data.clear10 import Clear10
from data.clear100 import Clear100
from data.folder_layout import LayoutError
from data.yearbook import PERIODS


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)  # format from the suffix: JPEG or PNG


def make_bin(root: Path, bin_name: str, classes, *, split: bool, per_class: int = 10):
    """A bin in the pre-split (`train/val/test/<class>`) or unsplit layout."""
    seed = 0
    for c in classes:
        for i in range(per_class):
            suffix = ".jpg" if i % 2 else ".png"
            sub = ("train", "train", "train", "val", "test")[i % 5] if split else ""
            write_image(root / bin_name / sub / c / f"img_{i:03d}{suffix}", seed)
            seed += 1


GOLDEN_SPLIT_HASH = "ed5bdce5bd1270ab"  # digits_drift 3.0.0
GOLDEN_IMAGE_HASH = "90bae05a22c89b6d"  # digits_drift 3.0.0, measured on amd-epyc-08328ec5


def read(name: str, data_dir: Path) -> dict:
    return tfds.data_source(name, data_dir=str(data_dir))


def labels_and_names(source) -> list[tuple[int, str]]:
    return [(int(ex["label"]), ex["file_name"].decode()) for ex in source]


def test_clear10_split_layout_excludes_background(tmp_path):
    make_bin(
        tmp_path / "manual", "year_1-2", [*Clear10.CLASS_NAMES, "BACKGROUND"], split=True
    )
    build(
        "clear10",
        manual_dir=tmp_path / "manual",
        data_dir=tmp_path / "out",
        configs=["year_1-2"],
    )
    source = read("clear10/year_1-2", tmp_path / "out")
    assert {k: len(v) for k, v in source.items()} == {
        "train": 60,
        "validation": 20,
        "test": 20,
    }
    builder = tfds.builder("clear10/year_1-2", data_dir=str(tmp_path / "out"))
    assert builder.info.features["label"].names == sorted(Clear10.CLASS_NAMES)
    assert builder.info.metadata["domains"] == list(data.clear10.CLEAR_BINS)
    for label, name in labels_and_names(source["train"]):
        assert name.split("/")[2] == sorted(Clear10.CLASS_NAMES)[label]
        assert "BACKGROUND" not in name
    first = source["train"][0]
    assert np.asarray(Image.open(__import__("io").BytesIO(first["image"]))).shape == (
        12,
        10,
        3,
    )


def test_clear10_keep_background_adds_a_class(tmp_path):
    make_bin(
        tmp_path / "manual", "year_3-4", [*Clear10.CLASS_NAMES, "BACKGROUND"], split=False
    )
    build(
        "clear10",
        manual_dir=tmp_path / "manual",
        data_dir=tmp_path / "out",
        configs=["year_3-4"],
        keep_background=True,
    )
    builder = tfds.builder(
        "clear10/year_3-4", data_dir=str(tmp_path / "out"), keep_background=True
    )
    assert builder.info.features["label"].names[0] == "BACKGROUND"
    assert builder.info.features["label"].num_classes == 11


def test_clear100_unsplit_layout_is_split_deterministically(tmp_path):
    make_bin(tmp_path / "manual", "year_5-6", Clear100.CLASS_NAMES, split=False)
    splits = []
    for run, seed in enumerate((42, 42, 7)):
        out = tmp_path / f"out{run}"
        build(
            "clear100",
            manual_dir=tmp_path / "manual",
            data_dir=out,
            configs=["year_5-6"],
            split_seed=seed,
        )
        source = read("clear100/year_5-6", out)
        splits.append({k: sorted(labels_and_names(v)) for k, v in source.items()})
    assert splits[0] == splits[1]
    assert splits[0] != splits[2]
    # 10 images per class: int(8) train, int(1) validation, 1 test, per class.
    assert [len(splits[0][s]) for s in ("train", "validation", "test")] == [240, 30, 30]
    names = sorted(Clear100.CLASS_NAMES)
    assert names.index("bookstore") == 5 and "billiard" not in names
    for label, name in splits[0]["train"]:
        assert name.split("/")[1] == names[label]


def test_yearbook_labels_are_earlier_and_later_decade(tmp_path):
    make_bin(tmp_path / "manual", "1950s_1960s", PERIODS["1950s_1960s"], split=True)
    build(
        "yearbook",
        manual_dir=tmp_path / "manual",
        data_dir=tmp_path / "out",
        configs=["1950s_1960s"],
    )
    builder = tfds.builder("yearbook/1950s_1960s", data_dir=str(tmp_path / "out"))
    assert builder.info.features["label"].names == ["1950s", "1960s"]
    source = read("yearbook/1950s_1960s", tmp_path / "out")
    for label, name in labels_and_names(source["test"]):
        assert name.split("/")[2] == ("1950s", "1960s")[label]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "needs --manual_dir"),
        (
            lambda root: (root / "other").mkdir(parents=True),
            r"bin folder .*year_1-2 does not exist\. Put each bin of the data set in its "
            r"own folder under the manual directory \(see docs/data.md\)\.",
        ),
        (lambda root: (root / "year_1-2" / "misc").mkdir(parents=True), "unknown layout"),
        (
            lambda root: make_bin(root, "year_1-2", Clear10.CLASS_NAMES[:-1], split=False),
            r"class folder\(s\) \['sweater'\] are missing",
        ),
        (
            lambda root: [
                (root / "year_1-2" / c).mkdir(parents=True) for c in Clear10.CLASS_NAMES
            ],
            r"year_1-2: no images found \(looked for \.jpg, \.jpeg, \.png, \.bmp, \.gif, "
            r"\.webp files inside the class folders\)\.",
        ),
        (
            lambda root: [
                make_bin(root, "year_1-2", Clear10.CLASS_NAMES, split=False, per_class=2),
                (root / "year_1-2" / "misc").mkdir(),
            ],
            r"unexpected folder\(s\) \['misc'\]; expected only the classes",
        ),
    ],
)
def test_bad_manual_directories_name_the_path(tmp_path, make, message):
    make(tmp_path / "manual")
    with pytest.raises(LayoutError, match=message):
        build(
            "clear10",
            manual_dir=tmp_path / "manual",
            data_dir=tmp_path / "out",
            configs=["year_1-2"],
        )


def test_corrupt_image_fails_or_is_skipped_and_counted(tmp_path):
    make_bin(tmp_path / "manual", "year_1-2", Clear10.CLASS_NAMES, split=False)
    bad = tmp_path / "manual" / "year_1-2" / "bus" / "img_000.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(LayoutError, match=r"bus/img_000.png: not a readable image"):
        build(
            "clear10",
            manual_dir=tmp_path / "manual",
            data_dir=tmp_path / "a",
            configs=["year_1-2"],
        )
    build(
        "clear10",
        manual_dir=tmp_path / "manual",
        data_dir=tmp_path / "b",
        configs=["year_1-2"],
        skip_corrupt=True,
    )
    builder = tfds.builder("clear10/year_1-2", data_dir=str(tmp_path / "b"))
    assert builder.info.metadata["skipped_corrupt"] == 1
    assert sum(len(v) for v in read("clear10/year_1-2", tmp_path / "b").values()) == 99


def test_unknown_data_set_or_config():
    with pytest.raises(ValueError, match="unknown data set 'clear1000'"):
        build("clear1000")
    with pytest.raises(ValueError, match=r"no config\(s\) \['year_11'\]"):
        build("clear10", configs=["year_11"])


def identities(data_dir, config: str) -> dict[str, set[int]]:
    splits = read(f"digits_drift/{config}", data_dir)
    return {name: {int(ex["identity"]) for ex in split} for name, split in splits.items()}


def test_digits_drift_test_digits_are_never_trained_on(digits_dir):
    """Sizes, and no test digit in any train, validation or pretraining split."""
    configs = ["pretrain", *data.digits_drift.DOMAINS]
    ids = {c: identities(digits_dir, c) for c in configs}
    pool = ids["pretrain"]
    assert sum(len(v) for v in pool.values()) == 1797  # sklearn's digits, each once
    assert (len(pool["train"]), len(pool["validation"]), len(pool["test"])) == (
        1078,
        269,
        450,
    )
    assert not (pool["train"] & pool["validation"] or pool["train"] & pool["test"])
    assert not pool["validation"] & pool["test"]
    seen = set().union(*(ids[c][s] for c in configs for s in ("train", "validation")))
    for config in data.digits_drift.DOMAINS:
        assert len(ids[config]["test"]) == 450  # >= 300 per domain
        assert ids[config]["test"] == pool["test"]
        assert (len(ids[config]["train"]), len(ids[config]["validation"])) == (300, 120)
        train = read(f"digits_drift/{config}", digits_dir)["train"]
        assert len(train) == 600  # two renderings of each train identity, different
        by_identity = {}
        for ex in train:
            by_identity.setdefault(int(ex["identity"]), []).append(ex["image"])
        assert {len(v) for v in by_identity.values()} == {2}
        assert all(np.any(a != b) for a, b in by_identity.values())
    assert not seen & pool["test"]
    example = read("digits_drift/d0", digits_dir)["train"][0]
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8


def test_digits_drift_splits_are_pinned(digits_dir):
    """A golden hash of every split's identities and labels: the partition and draws
    must not move with the machine, the NumPy version or file order."""
    import hashlib

    digest = hashlib.sha256()
    for config in ["pretrain", *data.digits_drift.DOMAINS]:
        for name, split in sorted(read(f"digits_drift/{config}", digits_dir).items()):
            pairs = sorted((int(ex["identity"]), int(ex["label"])) for ex in split)
            digest.update(f"{config}/{name}:{pairs}".encode())
    assert digest.hexdigest()[:16] == GOLDEN_SPLIT_HASH


def test_digits_drift_images_are_pinned(digits_dir):
    """A golden hash of every image's bytes (split, identity and order fixed): a change
    to a look, a rendering index or the renderer is a new version of the data set, not
    a silent one. NumPy's generators and PIL's resampling give the same bytes on every
    machine; a new PIL that resamples otherwise shows up here first."""
    import hashlib

    digest = hashlib.sha256()
    for config in ["pretrain", *data.digits_drift.DOMAINS]:
        for name, split in sorted(read(f"digits_drift/{config}", digits_dir).items()):
            digest.update(f"{config}/{name}".encode())
            examples = sorted(
                split, key=lambda ex: (int(ex["identity"]), ex["image"].tobytes())
            )
            for ex in examples:
                digest.update(ex["image"].tobytes())
    assert digest.hexdigest()[:16] == GOLDEN_IMAGE_HASH


def test_digits_drift_copies_differ_between_domains(digits_dir):
    """Each domain renders its own copy of a shared test digit (drift and jitter)."""
    first = {
        c: read(f"digits_drift/{c}", digits_dir)["test"][0]
        for c in ("pretrain", *data.digits_drift.DOMAINS)
    }
    assert len({int(ex["identity"]) for ex in first.values()}) == 1
    images = [ex["image"].astype(int) for ex in first.values()]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).mean() > 1


def test_digits_drift_pool_spans_what_the_domains_drift_through():
    """Each domain's ink, background and rotation lie in a window overlapping its
    neighbours'; the pool draws every factor over the union of those ranges."""
    dd = data.digits_drift
    looks = {
        c: [dd.look_of(c, i, r) for i in range(300) for r in range(2)]
        for c in ("pretrain", *dd.DOMAINS)
    }
    ink = {c: (min(x.ink for x in v), max(x.ink for x in v)) for c, v in looks.items()}
    for a, b in zip(dd.DOMAINS, dd.DOMAINS[1:], strict=False):
        assert ink[a][0] < ink[b][0] < ink[a][1] < ink[b][1]  # overlapping, moving on
    assert ink["pretrain"][0] < 0.01 and ink["pretrain"][1] > 0.99
    for factor in ("angle", "background"):
        pool = [getattr(x, factor) for x in looks["pretrain"]]
        drifted = [getattr(x, factor) for c in dd.DOMAINS for x in looks[c]]
        assert min(pool) <= min(drifted) + 1 and max(pool) >= max(drifted) - 1
    # in the pool a rendering's factors do not move together as drift does
    pool = np.array([[x.ink, x.background, x.angle] for x in looks["pretrain"]])
    assert np.all(np.abs(np.corrcoef(pool.T)[np.triu_indices(3, 1)]) < 0.15)


def test_digits_drift_is_real_drift(digits_dir):
    """A classifier fit on domain 0 (an independent sklearn model) degrades on d4. It
    reads the images at half resolution (2x2 means, colour kept): a quarter of the
    features, fit in half the time, to the same verdict (here 89 % on d0 and 50 % on d4
    at half resolution, 90 % and 47 % at full)."""
    from sklearn.linear_model import LogisticRegression

    def arrays(config, split):
        source = read(f"digits_drift/{config}", digits_dir)[split]
        x = np.stack([ex["image"] for ex in source]) / 255.0
        n, height, width, channels = x.shape
        halved = x.reshape(n, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))
        return halved.reshape(n, -1), np.array([ex["label"] for ex in source])

    classifier = LogisticRegression(max_iter=2000).fit(*arrays("d0", "train"))
    own = classifier.score(*arrays("d0", "test"))
    far = classifier.score(*arrays("d4", "test"))
    assert own >= 0.8
    assert far <= own - 0.3


@pytest.mark.parametrize("split", [True, False], ids=["pre-split", "unsplit"])
@pytest.mark.parametrize(
    ("name", "bin_name", "classes"),
    [
        ("clear10", "year_9-10", Clear10.CLASS_NAMES),
        ("clear100", "year_1-2", Clear100.CLASS_NAMES),
        ("yearbook", "1990s_and_later", PERIODS["1990s_and_later"]),
    ],
)
def test_every_builder_reads_both_layouts(tmp_path, name, bin_name, classes, split):
    make_bin(tmp_path / "manual", bin_name, classes, split=split)
    build(
        name, manual_dir=tmp_path / "manual", data_dir=tmp_path / "out", configs=[bin_name]
    )
    source = read(f"{name}/{bin_name}", tmp_path / "out")
    # 10 images per class: pre-split 6/2/2 by the fixture, unsplit 8/1/1 by the builder.
    per_class = (6, 2, 2) if split else (8, 1, 1)
    sizes = tuple(len(source[s]) for s in ("train", "validation", "test"))
    assert sizes == tuple(n * len(classes) for n in per_class)
    for label, file_name in labels_and_names(source["train"]):
        assert f"/{sorted(classes)[label]}/" in f"/{file_name}"


def test_splits_do_not_depend_on_the_order_the_filesystem_lists(tmp_path, monkeypatch):
    """The split is drawn over names sorted by us: a filesystem listing files in another
    order (ext4 hash order, NFS) must give the same train/validation/test files."""
    from data import folder_layout

    make_bin(tmp_path, "year_1-2", Clear10.CLASS_NAMES, split=False, per_class=10)
    normal = folder_layout.bin_examples(tmp_path / "year_1-2", Clear10.CLASS_NAMES)
    listed = Path.iterdir

    def shuffled(self):
        entries = list(listed(self))
        np.random.default_rng(len(entries)).shuffle(entries)
        return iter(entries)

    monkeypatch.setattr(Path, "iterdir", shuffled)
    again = folder_layout.bin_examples(tmp_path / "year_1-2", Clear10.CLASS_NAMES)
    assert again == normal
    first_class = [e.path.name for e in normal["test"] if e.label == 0]
    expected = np.random.default_rng([42, 0]).permutation(10)[9:]  # int(.8n)+int(.1n)
    assert first_class == [
        f"img_{i:03d}{'.jpg' if i % 2 else '.png'}" for i in sorted(expected)
    ]


def test_only_visible_image_files_are_listed(tmp_path):
    """Hidden files, other files and folders with an image suffix are not examples."""
    from data.folder_layout import list_images

    write_image(tmp_path / "b.png", 0)
    write_image(tmp_path / "a.jpg", 1)
    write_image(tmp_path / ".hidden.png", 2)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]


def test_importing_the_builders_defines_no_flags():
    """Every experiments command imports data.build; its flags (manual_dir, ...) belong
    to `python -m data.build` alone and must not show in those commands' --help."""
    from absl import flags

    import data.build  # noqa: F401

    ours = {"manual_dir", "data_dir", "configs", "skip_corrupt", "keep_background"}
    assert not ours & set(flags.FLAGS)


def test_the_build_command_builds_the_named_configs(tmp_path):
    import subprocess
    import sys

    command = ["data.build", "digits_drift", "--data_dir", str(tmp_path), "--configs", "d0"]
    done = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "digits_drift/d0:" in done.stdout
    built = [p.name for p in (tmp_path / "digits_drift").iterdir() if p.name[0] != "."]
    assert built == ["d0"]  # only the named config


def test_a_build_says_one_line_and_no_download(tmp_path, capfd):
    """TFDS's "Downloading and preparing dataset Unknown size" is wrong for builders
    that download nothing: one line per built config instead."""
    build("digits_drift", data_dir=tmp_path, configs=["d0"])
    out = capfd.readouterr().out
    assert out == f"built digits_drift/d0 in {tmp_path}/digits_drift/d0/3.0.0\n"

"""Builds a data set's TFDS configs: `python -m data.build NAME [--manual_dir DIR]`.

    python -m data.build digits_drift                   # embedded, offline, seconds
    python -m data.build clear100 --manual_dir ~/CLEAR100_30classes
    python -m data.build yearbook --manual_dir DIR --configs before_1950s --skip_corrupt

All configs (bins) are built unless --configs names some. Already built configs are
skipped by TFDS; output goes to --data_dir (default ~/tensorflow_datasets).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import tensorflow_datasets as tfds
from absl import app, flags, logging

import data  # registers the builders
from data.digits_drift import DigitsDrift
from data.folder_layout import LayoutError
from data.image_folder_builder import ImageFolderBuilder

BUILDERS = {
    "clear10": data.clear10.Clear10,
    "clear100": data.clear100.Clear100,
    "yearbook": data.yearbook.Yearbook,
    "digits_drift": DigitsDrift,
}


def define_flags() -> None:
    """This command's flags, defined only when it runs: the experiments import the
    builders, and their `--help` must not list flags that do nothing there."""
    flags.DEFINE_string("manual_dir", None, "Folder with one subfolder per bin.")
    flags.DEFINE_string("data_dir", None, "Where TFDS writes the built data.")
    flags.DEFINE_list("configs", None, "Bins to build (default: all).")
    flags.DEFINE_bool("skip_corrupt", False, "Skip and count unreadable images.")
    flags.DEFINE_bool("keep_background", False, "clear10: keep BACKGROUND.")


def build(
    name: str,
    *,
    manual_dir: str | None = None,
    data_dir: str | None = None,
    configs: list[str] | None = None,
    **builder_kwargs,
) -> dict[str, Path]:
    """Builds the configs of data set `name`; returns each config's data folder."""
    if name not in BUILDERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(BUILDERS)}")
    cls = BUILDERS[name]
    available = [c.name for c in cls.BUILDER_CONFIGS]
    unknown = sorted(set(configs or ()) - set(available))
    if unknown:
        raise ValueError(f"{name} has no config(s) {unknown}; it has {available}")
    download_config = None
    if issubclass(cls, ImageFolderBuilder):
        if manual_dir is None or not Path(manual_dir).expanduser().is_dir():
            raise LayoutError(
                f"{name} needs --manual_dir, a folder you prepared by hand "
                f"(given: {manual_dir}). {cls.manual_instructions()}"
            )
        manual = str(Path(manual_dir).expanduser())
        download_config = tfds.download.DownloadConfig(manual_dir=manual)
    tfds.display_progress_bar(sys.stderr.isatty())  # no cursor codes in a log file
    built = {}
    for config in configs or available:
        builder = cls(config=config, data_dir=data_dir, **builder_kwargs)
        builder.download_and_prepare(download_config=download_config)
        built[config] = Path(builder.data_dir)
    return built


def load_splits(name: str, config: str, data_dir: str | Path) -> dict:
    """The `tfds.data_source` splits of `name/config` in `data_dir`.

    Embedded data sets (no manual folder) are built on first use, by process 0 alone
    while the others wait; a missing manual data set is a LayoutError with the command
    that builds it.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(BUILDERS)}")
    if not issubclass(BUILDERS[name], ImageFolderBuilder):
        import jax
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            build(name, data_dir=str(data_dir), configs=[config])
        multihost_utils.sync_global_devices(f"data.build {name}/{config}")
    try:
        return tfds.data_source(f"{name}/{config}", data_dir=str(data_dir))
    except Exception as err:
        raise LayoutError(
            f"{name}/{config} is not built in {data_dir}. Build it with "
            f"`python -m data.build {name} --manual_dir DIR --data_dir {data_dir}`."
        ) from err


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError(
            f"usage: python -m data.build {{{','.join(BUILDERS)}}} [flags]"
        )
    name, given = argv[1], flags.FLAGS
    if not given["verbosity"].present:  # TFDS logs every step at INFO
        logging.set_verbosity(logging.WARNING)
    kwargs = {}
    if name in ("clear10", "clear100", "yearbook"):
        kwargs["skip_corrupt"] = given.skip_corrupt
    if name == "clear10":
        kwargs["keep_background"] = given.keep_background
    start = time.perf_counter()
    try:
        built = build(
            name,
            manual_dir=given.manual_dir,
            data_dir=given.data_dir,
            configs=given.configs,
            **kwargs,
        )
    except (LayoutError, ValueError) as err:  # the builders' own one-line messages
        raise SystemExit(f"data.build: {err}") from None
    except OSError as err:  # e.g. --data_dir is a file or not writable
        where = err.filename or given.data_dir
        raise SystemExit(
            f"data.build: {where}: {err.strerror or err}; choose a writable --data_dir"
        ) from None
    for config, path in built.items():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"{name}/{config}: {path} ({size / 2**20:.1f} MiB)")
    print(f"built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    define_flags()
    app.run(main)

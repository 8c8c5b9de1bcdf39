"""`python -m trainer train ...` and `python -m trainer tiny-model DIR [--family sd|sdxl|flux|sd3]`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from trainer.config import AnyConfig, ConfigError, load_config

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`--name value`, `--name=value` or a bare `--flag` (true) into raw option values."""
    values: dict[str, Any] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r} (options look like --name value)")
        name, sep, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if not sep:
            following = tokens[index + 1] if index + 1 < len(tokens) else None
            if following is None or following.startswith("--"):
                value = "true"  # a bare flag, as the script's store_true options
            else:
                value = following
                index += 1
        values[name] = None if value.lower() in ("none", "null") else value
        index += 1
    return values


def read_config_file(path: str) -> dict[str, Any]:
    """Options from a YAML or JSON file (a mapping of option names to values)."""
    import yaml  # JSON is YAML, so one parser reads both

    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"config: cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: {path} is not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config: {path} is not valid YAML or JSON: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config: {path} must hold a mapping of option names to values")
    return loaded


def build_config(config_file: str | None, overrides: list[str]) -> AnyConfig:
    """File options first, command-line options over them, validated together, as options of
    `--family` or else of the base model's family (read from its files)."""
    values = read_config_file(config_file) if config_file else {}
    values.update(parse_overrides(overrides))
    return load_config(values, values.get("family") or model_family(values.get("pretrained_model_name_or_path")))


def model_family(source: Any) -> str:
    """The family of the base model; "sd" when it is not here to read (the run names it later).
    A model of no supported family is refused now, naming what it is."""
    from trainer.detect import ModelNotFound, UnsupportedModel, detect_family

    if not isinstance(source, str) or not source:
        return "sd"
    try:
        return detect_family(source)
    except ModelNotFound:
        return "sd"
    except UnsupportedModel as error:
        raise ConfigError(f"pretrained_model_name_or_path: {error}") from None


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from trainer.events import ConsoleReporter, Event

    reporter = ConsoleReporter(bar=not args.no_progress)
    try:
        config = build_config(args.config, extra)
    except ConfigError as error:
        reporter(Event("error", message=str(error)))
        return EXIT_BAD_INPUT
    from trainer.data import DatasetError
    from trainer.loop import train

    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        _quiet_libraries()

    from trainer import metadata

    run_metadata = metadata.MetadataRecorder(config)  # ss_* and modelspec.* keys in the LoRA files

    def on_event(event) -> None:
        run_metadata(event)
        reporter(event)

    try:
        with metadata.recording(config, run_metadata):
            train(config, on_event)
    except (ConfigError, DatasetError):
        return EXIT_BAD_INPUT
    except Exception:  # the error event carries the message; the traceback goes to the log
        logging.getLogger("trainer").debug("training failed", exc_info=True)
        return EXIT_FAILED
    return 0


def _quiet_libraries() -> None:
    """Keep stderr to our log and progress bar: the libraries' loading bars and notices about
    dtype casts we make on purpose are noise here (LORAQ_LOG_LEVEL=INFO brings them back)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def _tiny_model(args: argparse.Namespace, extra: list[str]) -> int:
    from trainer.tiny import write_tiny_model

    path = write_tiny_model(args.directory, prediction_type=args.prediction_type, seed=args.seed, family=args.family,
                            flux_variant=args.flux_variant)
    print(json.dumps({"type": "done", "paths": [str(path)]}))
    return 0


def _sample_data(args: argparse.Namespace, extra: list[str]) -> int:
    from trainer.sample_data import write_sample_dataset

    path = write_sample_dataset(args.directory, n_images=args.count, size=args.size,
                                caption_style=args.captions)
    print(json.dumps({"type": "done", "paths": [str(path)]}))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="train a LoRA",
        # No abbreviations: `--con x` must be an unknown training option, not `--config x`.
        allow_abbrev=False,
        description="Train a LoRA. Options are the diffusers script's (--learning_rate 1e-4, "
                    "--center_crop, ...), given on the command line, in --config FILE, or both.",
    )
    train.add_argument("--config", help="YAML or JSON file of options")
    # Also spelled with an underscore, as every training option may be.
    train.add_argument("--no-progress", "--no_progress", action="store_true", help="no progress bar on stderr")
    train.set_defaults(handler=_train)

    tiny = commands.add_parser("tiny-model", help="write a tiny SD-, SDXL-, Flux- or SD3-shaped pipeline with random weights")
    tiny.add_argument("directory")
    tiny.add_argument("--family", default="sd", choices=["sd", "sdxl", "flux", "sd3"])
    tiny.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    tiny.add_argument("--flux-variant", default="dev", choices=["dev", "schnell"],
                      help="flux: dev has the guidance embedding, schnell not")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_tiny_model)

    sample = commands.add_parser("sample-data", help="write a small captioned image folder")
    sample.add_argument("directory")
    sample.add_argument("--count", type=int, default=8)
    sample.add_argument("--size", type=int, default=48)
    sample.add_argument("--captions", default="txt", choices=["txt", "jsonl"])
    sample.set_defaults(handler=_sample_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LORAQ_LOG_LEVEL", "WARNING"), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    args, extra = make_parser().parse_known_args(argv)
    if extra and args.command != "train":
        make_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    return args.handler(args, extra)

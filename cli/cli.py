"""The ``i2p`` command group.

Subcommands are imported only when invoked, so ``i2p detect`` never pays for (or needs) torch.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute"; the training and export commands need the [train]/[export] extras.
COMMANDS = {
    "train": "i2p.train.train_cli:train",
    "layers": "i2p.train.train_cli:layers",
    "backbones": "i2p.train.backbones_cli:backbones_command",
    "eval": "i2p.train.train_cli:evaluate",
    "calibrate": "i2p.evaluation.calibrate_cli:calibrate_command",  # torch-free
    "audit": "i2p.evaluation.audit_cli:audit_command",  # torch-free
    "demo": "i2p.demo:demo",
    "export": "i2p.export.export_cli:export",
    "detect": "i2p.runtime.detect_cli:detect",
    "bench": "i2p.runtime.bench_cli:bench",
    "scan": "i2p.runtime.scan_cli:scan_command",  # needs the [ray] extra
}
# module prefix -> the pip extra its imports need (the demo trains and exports)
EXTRAS = (
    ("i2p.export", "export"),
    ("i2p.demo", "export"),
    ("i2p.train", "train"),
    ("i2p.runtime.ray_", "ray"),
)


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:
            extra = next((x for prefix, x in EXTRAS if module.startswith(prefix)), "gpu")
            raise click.ClickException(
                f"'i2p {name}' needs packages that are not installed ({e.name or e}). "
                f"Install them with: pip install 'i2p-detector[{extra}]'"
            ) from e


@click.group(cls=LazyGroup)
@click.version_option(package_name="i2p-detector")
def main() -> None:
    """I2P synthetic-image detector: train, export, detect, benchmark."""


if __name__ == "__main__":
    main()

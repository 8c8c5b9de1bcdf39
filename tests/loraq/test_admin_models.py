"""`loraq-admin models add|list|remove` on the server's own database, as an admin runs it."""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy import select

from loraq.db import make_engine, make_session_factory
from loraq.models import BaseModelRow
from support.models import SINGLE_FILE_KEYS, header_only_checkpoint, pipeline_folder
from support.service import ROOT, service_env


def admin(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraq.admin", "models", *args], cwd=ROOT,
                          env=service_env(settings), capture_output=True, text=True, timeout=60)


def rows(settings) -> dict[str, BaseModelRow]:
    engine = make_engine(settings)
    try:
        with make_session_factory(engine)() as session:
            return {row.name: row for row in session.scalars(select(BaseModelRow))}
    finally:
        engine.dispose()


def test_add_list_and_remove(settings, tmp_path):
    sdxl = pipeline_folder(tmp_path / "sdxl-base", "StableDiffusionXLPipeline")
    checkpoint = header_only_checkpoint(tmp_path / "finetune.safetensors", SINGLE_FILE_KEYS["sdxl"])

    folder = admin(settings, "add", str(sdxl), "--name", "xl")
    needs_config = admin(settings, "add", str(checkpoint))
    single = admin(settings, "add", str(checkpoint), "--config", str(sdxl))
    listed = admin(settings, "list")

    assert folder.returncode == 0, folder.stderr
    assert folder.stdout.strip() == "added xl: sdxl folder"
    assert needs_config.returncode == 1 and "needs its family's config folder" in needs_config.stderr
    assert single.returncode == 0, single.stderr
    assert single.stdout.strip() == f"added finetune: sdxl single_file (single file, config {sdxl.resolve()})"
    stored = rows(settings)
    assert (stored["xl"].family, stored["xl"].source, stored["xl"].added_by) == ("sdxl", str(sdxl.resolve()), "loraq-admin")
    assert (stored["finetune"].source, stored["finetune"].config_dir) == (str(checkpoint.resolve()), str(sdxl.resolve()))
    lines = {line.split("\t")[0]: line.split("\t") for line in listed.stdout.splitlines()}
    assert lines["tiny-sd"][1:3] == ["sd", "demo"] and lines["xl"][1:3] == ["sdxl", "added"]
    assert lines["finetune"][1:3] == ["sdxl", "added"]

    removed = admin(settings, "remove", "xl")
    demo = admin(settings, "remove", "tiny-sd")
    unknown = admin(settings, "remove", "xl")

    assert removed.returncode == 0 and "xl" not in rows(settings)
    assert demo.returncode == 1 and "comes from the settings" in demo.stderr
    assert unknown.returncode == 1 and "base model 'xl' not found" in unknown.stderr


def test_what_is_no_base_model_is_refused_with_a_message(settings, tmp_path):
    random_file = tmp_path / "random.safetensors"
    random_file.write_bytes(bytes(range(256)) * 16)
    pixart = pipeline_folder(tmp_path / "pixart", "PixArtSigmaPipeline")

    not_safetensors = admin(settings, "add", str(random_file))
    unsupported = admin(settings, "add", str(pixart))
    clash = admin(settings, "add", str(pipeline_folder(tmp_path / "sd", "StableDiffusionPipeline")), "--name", "tiny-sd")

    assert not_safetensors.returncode == 1
    assert f"source: {random_file}: not a safetensors file" in not_safetensors.stderr
    assert unsupported.returncode == 1 and "PixArtSigmaPipeline is not a supported family (supported: sd, sdxl, flux, sd3)" in unsupported.stderr
    assert clash.returncode == 1 and "already exists" in clash.stderr
    assert rows(settings) == {}


def test_flux_and_sd3_single_files_are_added_with_their_config_folder(settings, tmp_path):
    flux = pipeline_folder(tmp_path / "flux-dev", "FluxPipeline")
    sd3 = pipeline_folder(tmp_path / "sd35", "StableDiffusion3Pipeline")
    flux_file = header_only_checkpoint(tmp_path / "flux-finetune.safetensors",
                                       ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"])
    sd3_file = header_only_checkpoint(tmp_path / "sd3-finetune.safetensors",
                                      ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"])

    added = admin(settings, "add", str(flux_file), "--config", str(flux))
    wrong_config = admin(settings, "add", str(sd3_file), "--config", str(flux))
    sd3_added = admin(settings, "add", str(sd3_file), "--config", str(sd3))

    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == f"added flux-finetune: flux single_file (single file, config {flux.resolve()})"
    assert wrong_config.returncode == 1 and "it is a pipeline of the flux family, but" in wrong_config.stderr
    assert sd3_added.returncode == 0, sd3_added.stderr
    assert {name: row.family for name, row in rows(settings).items() if name.endswith("finetune")} == {
        "flux-finetune": "flux", "sd3-finetune": "sd3"}

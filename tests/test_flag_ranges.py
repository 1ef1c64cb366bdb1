"""Bad flag values are usage errors before any work: exit 2, one stderr line naming the flag, nothing written."""

from __future__ import annotations

import pytest

from cloaklab.tests.conftest import photo

# (command line after INPUT -o OUTPUT, the flag the one line must name). {file} is an existing regular file.
PURIFY = [
    ("-m gaussian --sigma 0", "--sigma"),
    ("-m gaussian --sigma -1", "--sigma"), ("-m gaussian --sigma nan", "--sigma"),
    ("-m gaussian --sigma inf", "--sigma"), ("-m tvm --resolution 0", "--resolution"),
    ("-m tvm --drop 1.5", "--drop"), ("-m tvm --drop -0.1", "--drop"), ("-m tvm --tv-weight nan", "--tv-weight"),
    ("-m tvm --iters 0", "--iters"), ("-m adverse-cleaner --radius -1", "--radius"),
    ("-m adverse-cleaner --eps 0", "--eps"), ("-m adverse-cleaner --bilateral-iters -2", "--bilateral-iters"),
    ("-m jpeg --quality 0", "--quality"), ("-m jpeg --jpeg-scale 4", "--jpeg-scale"),
    ("-m webp --quality 101", "--quality"),
    ("--max-pixels -5", "--max-pixels"), ("--max-pixels 0", "--max-pixels"), ("--batch-size 0", "--batch-size"),
    ("-m regen --t 1000", "--t"), ("-m regen --guidance nan", "--guidance"), ("-m regen --steps 0", "--steps"),
    ("-m gridpure --gamma 1.5", "--gamma"), ("-m impress --lr 0", "--lr"), ("-m impress --lr -1", "--lr"),
    ("-m noisy-upscale --noise 2", "--noise"), ("-m noisy-upscale --noise-level 400", "--noise-level"),
    ("-m diffpure-pixel --eta nan", "--eta"), ("-m ddspure --sigma -11", "--sigma"),
    ("-m codeformer-sr --fidelity 1.5", "--fidelity"), ("-m bogus", "--method"),
    ("-o {file}", "--output"),
]
POISON = [
    ("--eps 300", "--eps"), ("--eps 0", "--eps"), ("--eps nan", "--eps"), ("--eps -1", "--eps"),
    ("--step-size 0", "--step-size"), ("--step-size inf", "--step-size"), ("--steps -1", "--steps"),
    ("--t-range 500,100", "--t-range"), ("--t-range 0,2000", "--t-range"), ("--resolution -8", "--resolution"),
    ("-a lf-adm+ --lf-ratio 0", "--lf-ratio"), ("-a lf-adm+ --lf-ratio 1.5", "--lf-ratio"),
    ("-a mist --fused-weight nan", "--fused-weight"), ("--eot-samples 0", "--eot-samples"),
    ("--jpeg-quality 0", "--jpeg-quality"), ("--batch-size 0", "--batch-size"), ("--max-pixels -5", "--max-pixels"),
    ("-a aspl --param rounds=0", "--rounds"), ("-a aspl --param db_lr=nan", "--db-lr"),
    ("-a da --param strength=2", "--strength"),
    ("-a metacloak --param trials=-1", "--trials"), ("--mask /nonexistent/mask.png", "--mask"),
    ("-a aspl --clean-dir /nonexistent", "--clean-dir"), ("-o {file}", "--output"),
]
TRAIN_TI = [
    ("--lr 0", "--lr"), ("--lr nan", "--lr"), ("--steps 0", "--steps"), ("--resolution 0", "--resolution"),
    ("--t-param -1", "--t-param"), ("--jpeg 0", "--jpeg"), ("--batch-size 0", "--batch-size"),
    ("--num-vectors 0", "--num-vectors"), ("--masks /nonexistent", "--masks"), ("-o {file}", "--output"),
    ("--flip-p 1.5", "--flip-p"), ("--flip-p nan", "--flip-p"), ("--weight-decay -1", "--weight-decay"),
    ("--jpeg-scale 4", "--jpeg-scale"),
]
TRAIN_DB = [
    ("--lr -1", "--lr"), ("--weight-decay -1", "--weight-decay"), ("--max-grad-norm nan", "--max-grad-norm"),
    ("--prior-weight -1", "--prior-weight"), ("--class-guidance nan", "--class-guidance"),
    ("--resolution 4", "--resolution"), ("--lora 0", "--lora"), ("--t-param -2", "--t-param"),
    ("-o {file}", "--output"),
]
IMMUNIZE = [
    ("--lr 0", "--lr"), ("--defence-lr -1", "--defence-lr"), ("--max-grad-norm inf", "--max-grad-norm"),
    ("--weight-decay nan", "--weight-decay"), ("--steps 0", "--steps"), ("--lora-rank 0", "--lora-rank"),
    ("--resolution 0", "--resolution"), ("-o {file}", "--output"),
]
SSM = [("--samples 0", "--samples"), ("--quality 0", "--quality"), ("--resolution 3", "--resolution"),
       ("--embedding /nonexistent.safetensors", "--embedding"), ("-o {file}", "--output")]
MASK = [("--dilate -1", "--dilate"), ("--points-per-side 0", "--points-per-side"),
        ("--max-pixels 0", "--max-pixels"),
        ("-o {file}", "--output")]
SCORE = [("--batch-size 0", "--batch-size"), ("--ref /nonexistent", "--ref"), ("--max-pixels -1", "--max-pixels")]
GENERATE = [("--steps 0", "--steps"), ("--guidance nan", "--guidance"), ("--eta 2", "--eta"),
            ("--resolution 0", "--resolution"), ("--lora-scale nan", "--lora-scale"),
            ("--num-per-prompt 0", "--num-per-prompt"), ("--embedding /nonexistent", "--embedding"),
            ("-o {file}", "--output")]

ROWS = ([("purify", *row) for row in PURIFY] + [("poison", *row) for row in POISON]
        + [("train-ti", *row) for row in TRAIN_TI] + [("train-db", *row) for row in TRAIN_DB]
        + [("immunize", *row) for row in IMMUNIZE] + [("ssm", *row) for row in SSM]
        + [("mask", *row) for row in MASK] + [("score", *row) for row in SCORE]
        + [("generate", *row) for row in GENERATE])
REQUIRED = {"train-db": ["--instance-prompt", "a photo of sks person"], "ssm": ["--prompt", "a photo"],
            "generate": ["--prompts", "a photo"], "score": ["--metrics", "psnr"],
            "immunize": ["--against", "ti"]}


@pytest.mark.parametrize("command,flags,flag", ROWS, ids=[f"{c}:{f}" for c, f, _ in ROWS])
def test_bad_flag_value_is_one_usage_line_before_any_work(tmp_path, cli, command, flags, flag):
    folder = tmp_path / "in"
    folder.mkdir()
    photo("rocket", 32).save(folder / "a.png")
    existing = tmp_path / "existing.txt"
    existing.write_text("a user's file\n")
    output = tmp_path / ("out.json" if command == "score" else "out")
    args = [command] + ([] if command == "generate" else [folder]) + ["-o", output] + REQUIRED.get(command, [])
    args += ["--model", "tiny"] if command not in ("mask", "score") else []
    args += [part.replace("{file}", str(existing)) for part in flags.split()]
    code, stdout, stderr = cli(args)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and flag in lines[0], stderr
    assert stdout == ""
    assert not output.exists()
    assert existing.read_text() == "a user's file\n"


def test_one_missing_path_in_a_stdin_list_is_a_rejection_not_an_abort(tmp_path, cli):
    folder = tmp_path / "in"
    folder.mkdir()
    photo("rocket", 32).save(folder / "a.png")
    listing = f"{folder / 'a.png'}\n{folder / 'gone.png'}\n"
    code, _, stderr = cli(["purify", "-", "-o", tmp_path / "out", "-m", "jpeg"], input=listing)
    assert code == 3, stderr
    assert (tmp_path / "out" / "a.png").is_file()
    assert "gone.png" in stderr


def test_an_extreme_aspect_ratio_is_rejected_before_the_working_image_is_made(tmp_path, cli):
    """4000×8 at short side 512 would be a 512×256,000 working image (> 6 GB RSS): one line, exit 3, no model."""
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (4000, 8), (120, 90, 60)).save(folder / "strip.png")
    code, _, stderr = cli(["poison", folder, "-o", tmp_path / "out", "--model", "tiny", "-a", "adm+",
                           "--steps", "1"])
    assert code == 3, stderr
    assert "strip.png" in stderr and "1:8" in stderr
    assert not (tmp_path / "out" / "strip.png").exists()

"""completions/ and man/ are generated from the app; a stale copy fails here (`make completions` fixes it)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from cloaklab.cli import docgen


def test_completions_and_man_pages_are_fresh():
    stale = [str(path.relative_to(docgen.ROOT)) for path in docgen.stale_files()]
    assert stale == [], f"regenerate with `make completions`: {stale}"


def test_named_sets_in_completions_are_the_sets_the_code_accepts():
    from cloaklab.ops.prompts import PROMPT_SETS
    from cloaklab.ops.train.data import TEMPLATE_SETS

    named = {name: option.named for doc in docgen.command_docs()[1] for option in doc.options
             for name in option.names if option.named}
    assert named == {"--prompts": list(PROMPT_SETS), "-p": list(PROMPT_SETS), "--templates": list(TEMPLATE_SETS),
                     "--model": ["tiny", "toy", "sd15-shaped"]}


def test_generator_notices_a_changed_flag(monkeypatch):
    app_help, docs = docgen.command_docs()
    docs[0].options[0].names = ["--renamed-flag"]
    monkeypatch.setattr(docgen, "command_docs", lambda: (app_help, docs))
    assert docgen.stale_files(), "a renamed option must make the committed files stale"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_options_and_choices(tmp_path):
    script = docgen.ROOT / "completions" / "cloak.bash"
    (tmp_path / "my_prompts.txt").write_text("a {token}\n")

    def complete(*words: str) -> set[str]:
        line = " ".join(f"'{w}'" for w in words)
        program = (f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _cloak; "
                   'printf "%s\\n" "${COMPREPLY[@]}"')
        return set(subprocess.run(["bash", "-c", program], capture_output=True, text=True, cwd=tmp_path).stdout.split())

    assert {"poison", "purify"} <= complete("cloak", "p")
    assert "--method" in complete("cloak", "purify", "--me")
    assert {"jpeg", "webp"} <= complete("cloak", "purify", "--method", "")
    # a named set or a file: both are offered, and a choice-less value option offers nothing
    assert {"objects24", "faces", "my_prompts.txt"} <= complete("cloak", "generate", "--prompts", "")
    assert complete("cloak", "train-ti", "--templates", "o") == {"object"}
    assert {"object", "style", "my_prompts.txt"} <= complete("cloak", "train-ti", "--templates", "")
    assert complete("cloak", "generate", "--token", "") == set()
    # value completion for free-text options (issue 20 item 7)
    assert {"auto", "cpu", "cuda", "mps"} <= complete("cloak", "poison", "--device", "")
    assert complete("cloak", "train-ti", "--dtype", "") == {"auto", "fp32", "fp16", "bf16"}
    assert complete("cloak", "generate", "--model", "t") == {"tiny", "toy"}
    (tmp_path / "my_model").mkdir()
    assert {"tiny", "toy", "sd15-shaped", "my_model"} <= complete("cloak", "poison", "--model", "")
    assert {"psnr", "toy-acc", "toy-sim", "all-offline"} <= complete("cloak", "score", "--metrics", "")
    assert {"adm+", "aspl", "lf-adm+"} <= complete("cloak", "poison", "--attack", "")
    assert {"adm+", "aspl"} <= complete("cloak", "poison", "-a", "")
    assert "gridpure" in complete("cloak", "purify", "-m", "")


@pytest.mark.parametrize("text, summary", [
    ("Maximize the loss w.r.t. the image. Then more.", "Maximize the loss w.r.t. the image."),
    ("Sensitivity (paper 000 Eq. 6) per token. Then.", "Sensitivity (paper 000 Eq. 6) per token."),
    ("Class word (e.g. person, dog). Then.", "Class word (e.g. person, dog)."),
    # the last comma before 160 characters
    ("Segment with SAM: " + "a mask, " * 30 + "done. Then.", "Segment with SAM: " + "a mask, " * 16 + "a mask …"),
    ("Run " + "x" * 200 + ". Then.", "Run " + "x" * 200 + "."),  # one long clause: whole, not cut
])
def test_summaries_end_at_a_sentence_or_a_clause_never_mid_phrase(text, summary):
    assert docgen._first_sentence(text) == summary


def test_no_generated_summary_is_cut_mid_phrase():
    app_help, docs = docgen.command_docs()
    texts = [doc.summary for doc in docs] + [docgen._first_sentence(o.help) for doc in docs for o in doc.options]
    for text in texts:
        assert not text.endswith(("w.r.t.", "e.g.", "Eq.", "App.", "Fig.", "Alg.", "i.e.")), text
        assert text.count("(") == text.count(")"), text  # no bracket left open by a cut
        assert text == "" or text.endswith((".", "!", "?", "…", ")")) or len(text) < 160, text


def test_fish_describes_each_method_and_zsh_offers_the_values():
    fish = (docgen.ROOT / "completions" / "cloak.fish").read_text()
    zsh = (docgen.ROOT / "completions" / "cloak.zsh").read_text()
    from cloaklab.ops.attacks import attack_names
    from cloaklab.ops.metrics import METRICS
    from cloaklab.ops.purify import PURIFIERS

    for command, flag, names in [("purify", "-l method", PURIFIERS), ("poison", "-l attack", attack_names()),
                                 ("score", "-l metrics", METRICS)]:
        for name in names:
            lines = [line for line in fish.splitlines() if f"from {command}\"" in line and flag in line
                     and f'-xa "{name}" -d "' in line]
            assert len(lines) == 1, (command, name)
            assert len(lines[0].split(' -d "')[1]) > 10  # a real description
    assert "--device[" in zsh and ":value:(auto cpu cuda cuda:0 cuda:1 mps)" in zsh
    assert "sets:set:(tiny toy sd15-shaped)" in zsh


def test_hidden_deprecated_spellings_are_not_offered():
    app_help, docs = docgen.command_docs()
    by_name = {doc.name: {n for o in doc.options for n in o.names} for doc in docs}
    assert "-m" not in by_name["score"] and "--metrics" in by_name["score"]
    assert "-p" not in by_name["poison"] and "--param" in by_name["poison"]


def test_make_docs_check_target_exists_and_no_tracked_file_is_ignored():
    makefile = (docgen.ROOT / "Makefile").read_text()
    phony = next(line for line in makefile.splitlines() if line.startswith(".PHONY:")).split()[1:]
    targets = {line.split(":")[0] for line in makefile.splitlines() if line and line[0].isalpha() and ":" in line}
    assert set(phony) <= targets, f".PHONY names targets that do not exist: {set(phony) - targets}"
    assert "docs-check" in targets
    if shutil.which("git") and (docgen.ROOT / ".git").exists():
        ignored = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=docgen.ROOT,
                                 capture_output=True, text=True).stdout.split()
        assert ignored == [], f"tracked files that .gitignore lists: {ignored}"

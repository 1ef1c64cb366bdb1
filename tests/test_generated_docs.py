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
    assert named == {"--prompts": list(PROMPT_SETS), "-p": list(PROMPT_SETS), "--templates": list(TEMPLATE_SETS)}


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

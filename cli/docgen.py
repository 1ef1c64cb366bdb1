"""Generate shell completions (bash, zsh, fish) and man pages from the typer app's command tree.

``python -m cloaklab.cli.docgen`` (``make completions``) rewrites ``completions/`` and ``man/``; ``--check`` exits 1
when the committed files are stale (a test runs that). We walk the app's click command tree ourselves: typer ≥ 0.26
vendors click, which breaks click-man, and typer's own completion scripts call back into the program at TAB time
(slow with torch installed) — these static scripts don't.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROG = "cloak"


@dataclass
class OptionDoc:
    names: list[str]
    help: str
    takes_value: bool
    choices: list[str]
    kind: str  # "dir", "file", "path" or "" for plain values
    named: list[str] = field(default_factory=list)  # named sets a path option also takes (e.g. --prompts objects24)
    values: list[str] = field(default_factory=list)  # suggested values of a free-text option (--device cuda:0)
    value_help: dict[str, str] = field(default_factory=dict)  # a description per choice (fish shows them)


@dataclass
class CommandDoc:
    name: str
    summary: str
    help: str
    options: list[OptionDoc]
    arguments: list[str]


# Words that end in a full stop without ending the sentence ("w.r.t. the input", "paper 000 Eq. 6", "e.g. 10").
ABBREVIATIONS = {"e.g", "i.e", "w.r.t", "eq", "eqs", "app", "fig", "figs", "sec", "al", "vs", "cf", "etc", "no",
                 "approx", "resp", "incl", "tab", "alg", "ref", "ch", "pp"}
SUMMARY_CHARS = 160


def _first_sentence(text: str) -> str:
    """The first sentence, not cut at an abbreviation; a long one is shortened at its last top-level clause
    boundary (``;``, ``,``, `` —``, `` (``) before SUMMARY_CHARS with an ellipsis, never inside a word or bracket."""
    text = " ".join((text or "").split())
    end = len(text)
    for match in re.finditer(r"[.!?](?=\s|$)", text):
        word = re.split(r"[\s(]", text[:match.start()])[-1].lower()
        if match.group() == "." and (word in ABBREVIATIONS or re.fullmatch(r"[a-z]", word)):
            continue  # "e.g." / "Eq." / an initial
        end = match.end()
        break
    sentence = text[:end]
    if len(sentence) <= SUMMARY_CHARS:
        return sentence
    depth, cuts = 0, []
    for i, char in enumerate(sentence[:SUMMARY_CHARS]):
        if char in "([{":
            if depth == 0 and i and sentence[i - 1] == " ":
                cuts.append(i - 1)
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0 and (char in ";," or sentence.startswith(" —", i)):
            cuts.append(i)
    if not cuts:
        return sentence  # one long clause: whole rather than cut mid-phrase
    return sentence[:cuts[-1]].rstrip(" ,;:") + " …"


def _annotation(param):
    """The Python type behind a typer parameter (``Optional[X]``/``list[X]`` unwrapped)."""
    import typing

    descriptor = getattr(param, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None) or getattr(param, "type", None)
    while typing.get_args(annotation):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if not args or args[0] is annotation:
            break
        annotation = args[0]
    return annotation


def _choices(param) -> list[str]:
    import enum
    import typing

    annotation = _annotation(param)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(member.value) for member in annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    choices = getattr(getattr(param, "type", None), "choices", None)
    return [str(getattr(c, "value", c)) for c in choices] if choices else []


PATH_WORDS = ("model", "checkpoint", "embedding", "masks", "ref", "lora", "target")


def _named_sets(param) -> list[str]:
    """Names an option takes besides a file, from a metavar such as ``object|style|FILE``."""
    parts = (getattr(param, "metavar", None) or "").split("|")
    return [p for p in parts if p != "FILE"] if len(parts) > 1 and "FILE" in parts else []


MODEL_NAMES = ["tiny", "toy", "sd15-shaped"]  # built-in --model names besides Hub ids, folders and files
SUGGESTED = {"--device": ["auto", "cpu", "cuda", "cuda:0", "cuda:1", "mps"],
             "--dtype": ["auto", "fp32", "fp16", "bf16"]}


def _value_help(command: str, names: list[str]) -> dict[str, str]:
    """One-line descriptions of the values of --attack, --method and --metrics, from the method registries."""
    if command == "poison" and "--attack" in names:
        from cloaklab.ops.attacks import attack_names, get_attack

        return {name: _first_sentence(get_attack(name).summary) for name in attack_names()}
    if command == "purify" and "--method" in names:
        from cloaklab.ops.purify import PURIFIERS

        return {name: _first_sentence(spec.summary) for name, spec in PURIFIERS.items()}
    if command == "score" and "--metrics" in names:
        from cloaklab.ops.metrics import METRICS

        return {"all-offline": "every metric that needs no download",
                **{name: _first_sentence(spec.summary) for name, spec in METRICS.items()}}
    return {}


def _kind(param) -> str:
    type_name = getattr(_annotation(param), "__name__", "").lower()
    names = " ".join(param.opts)
    if "output" in names or names.endswith("-dir") or "dir" in names:
        return "dir"
    if "path" in type_name or "file" in type_name or any(k in names for k in PATH_WORDS) or _named_sets(param):
        return "path"
    return ""


def command_docs() -> tuple[str, list[CommandDoc]]:
    import typer

    from .main import app

    group = typer.main.get_command(app)
    docs = []
    for name in sorted(group.commands):
        command = group.commands[name]
        options, arguments = [], []
        for param in command.params:
            if param.param_type_name == "argument":
                arguments.append(param.name.upper())
                continue
            if getattr(param, "hidden", False):
                continue  # deprecated spellings (score -m, poison -p) still parse but are not offered
            names = [n for n in [*param.opts, *param.secondary_opts] if n.startswith("-")]
            option = OptionDoc(names, " ".join((param.help or "").split()), not param.is_flag,
                               _choices(param), _kind(param), _named_sets(param))
            option.value_help = _value_help(name, names)
            if "--model" in names:
                option.named = MODEL_NAMES
            elif not option.choices:
                option.values = next((v for n, v in SUGGESTED.items() if n in names), []) or list(option.value_help)
            options.append(option)
        options.append(OptionDoc(["--help", "-h"], "Show the help and exit.", False, [], ""))
        text = command.help or ""
        docs.append(CommandDoc(name, _first_sentence(text), " ".join(text.split()), options, arguments))
    return " ".join((group.help or "").split()), docs


# --------------------------------------------------------------------------------------------------- bash
def bash_script(docs: list[CommandDoc]) -> str:
    lines = [f"# bash completion for {PROG} — generated by `make completions` from the typer app; do not edit.",
             f"_{PROG}() {{",
             '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" cmd="" i',
             '    for ((i = 1; i < COMP_CWORD; i++)); do',
             '        case "${COMP_WORDS[i]}" in -*) ;; *) cmd="${COMP_WORDS[i]}"; break ;; esac',
             "    done",
             '    if [[ -z "$cmd" ]]; then',
             f'        COMPREPLY=($(compgen -W "{" ".join(d.name for d in docs)} --help --version" -- "$cur"))',
             "        return",
             "    fi",
             '    case "$cmd" in']
    for doc in docs:
        lines.append(f"        {doc.name})")
        lines.append('            case "$prev" in')
        for option in doc.options:
            if not option.takes_value:
                continue
            pattern = "|".join(option.names)
            if option.choices or option.values:
                action = f'COMPREPLY=($(compgen -W "{" ".join(option.choices or option.values)}" -- "$cur"))'
            elif option.kind == "dir":
                action = 'COMPREPLY=($(compgen -d -- "$cur"))'
            elif option.kind == "path" and option.named:
                action = f'COMPREPLY=($(compgen -W "{" ".join(option.named)}" -- "$cur") $(compgen -f -- "$cur"))'
            elif option.kind == "path":
                action = 'COMPREPLY=($(compgen -f -- "$cur"))'
            else:
                action = "COMPREPLY=()"
            lines.append(f"                {pattern}) {action}; return ;;")
        lines.append("            esac")
        flags = " ".join(name for option in doc.options for name in option.names)
        lines.append('            if [[ "$cur" == -* ]]; then')
        lines.append(f'                COMPREPLY=($(compgen -W "{flags}" -- "$cur"))')
        lines.append("            else")
        lines.append('                COMPREPLY=($(compgen -f -- "$cur"))')
        lines.append("            fi ;;")
    lines += ["    esac", "}", f"complete -o filenames -o bashdefault -F _{PROG} {PROG}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- zsh
def _zsh_escape(text: str) -> str:
    return _first_sentence(text).replace("\\", "\\\\").replace("'", "'\\''").replace("[", "(").replace("]", ")") \
        .replace(":", " -")


def zsh_script(docs: list[CommandDoc]) -> str:
    lines = [f"#compdef {PROG}", f"# zsh completion for {PROG} — generated by `make completions`; do not edit.", "",
             f"_{PROG}() {{", "    local -a commands", "    commands=("]
    for doc in docs:
        lines.append(f"        '{doc.name}:{_zsh_escape(doc.summary)}'")
    lines += ["    )", "    if (( CURRENT == 2 )); then", "        _describe -t commands 'cloak command' commands",
              "        _arguments '--help[Show the help]' '--version[Print the version]'", "        return", "    fi",
              "    local cmd=${words[2]}", "    shift words", "    (( CURRENT-- ))", "    case $cmd in"]
    for doc in docs:
        lines.append(f"        {doc.name})")
        lines.append("            _arguments -s \\")
        for option in doc.options:
            description = _zsh_escape(option.help)
            if option.takes_value:
                if option.choices or option.values:
                    action = f":value:({' '.join(option.choices or option.values)})"
                elif option.kind == "dir":
                    action = ":directory:_files -/"
                elif option.kind == "path" and option.named:
                    action = f":value:_alternative \"sets:set:({' '.join(option.named)})\" \"files:file:_files\""
                elif option.kind == "path":
                    action = ":file:_files"
                else:
                    action = ":value: "
            else:
                action = ""
            names = option.names
            spec = f"'{names[0]}[{description}]{action}'" if len(names) == 1 else \
                f"'({' '.join(names)})'{{{','.join(names)}}}'[{description}]{action}'"
            lines.append(f"                {spec} \\")
        lines.append("                '*:file:_files' ;;")
    lines += ["    esac", "}", "", f'_{PROG} "$@"', ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- fish
def _fish_escape(text: str) -> str:
    return _first_sentence(text).replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")


def fish_script(docs: list[CommandDoc]) -> str:
    names = " ".join(doc.name for doc in docs)
    lines = [f"# fish completion for {PROG} — generated by `make completions`; do not edit.",
             f"complete -c {PROG} -f",
             f'complete -c {PROG} -n "not __fish_seen_subcommand_from {names}" -l version -d "Print the version"']
    for doc in docs:
        lines.append(f'complete -c {PROG} -n "not __fish_seen_subcommand_from {names}" -a {doc.name} '
                     f'-d "{_fish_escape(doc.summary)}"')
    for doc in docs:
        condition = f'-n "__fish_seen_subcommand_from {doc.name}"'
        lines.append(f"complete -c {PROG} {condition} -F")
        for option in doc.options:
            flags = " ".join(f"-l {n[2:]}" if n.startswith("--") else f"-s {n[1:]}" for n in option.names)
            extra = ""
            suggested = option.choices or option.values
            if option.takes_value:
                extra = f' -xa "{" ".join(suggested)}"' if suggested and not option.value_help else \
                    " -x" if suggested else f' -ra "{" ".join(option.named)}"' if option.named else " -r"
            lines.append(f'complete -c {PROG} {condition} {flags}{extra} -d "{_fish_escape(option.help)}"')
            for value in suggested if option.value_help else []:  # one line per value: fish shows its description
                description = option.value_help.get(value, value)
                lines.append(f'complete -c {PROG} {condition} {flags} -xa "{_fish_escape(value)}" '
                             f'-d "{_fish_escape(description)}"')
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- man
def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cloaklab")
    except PackageNotFoundError:
        return "dev"


def man_pages(app_help: str, docs: list[CommandDoc]) -> dict[str, str]:
    version = _version()
    header = f'.TH "{{title}}" "1" "" "cloaklab {version}" "cloaklab manual"\n'
    pages = {}
    overview = [header.format(title=PROG.upper()), ".SH NAME", f"{PROG} \\- {_roff(_first_sentence(app_help))}",
                ".SH SYNOPSIS", f".B {PROG}", "COMMAND INPUT... \\-o OUTPUT [OPTIONS]", ".SH DESCRIPTION",
                _roff(app_help), ".SH COMMANDS"]
    for doc in docs:
        overview += [".TP", f".B {doc.name}", _roff(doc.summary) or "\\&"]
    overview += [".SH EXIT STATUS", "0 all done; 1 a fault left outputs unwritten; 2 usage error; 3 partial (some "
                 "inputs rejected, the rest done).", ".SH SEE ALSO",
                 ", ".join(f"{PROG}\\-{doc.name}(1)" for doc in docs)]
    pages[f"{PROG}.1"] = "\n".join(overview) + "\n"
    for doc in docs:
        page = [header.format(title=f"{PROG.upper()}-{doc.name.upper()}"), ".SH NAME",
                f"{PROG}\\-{doc.name} \\- {_roff(doc.summary)}", ".SH SYNOPSIS", f".B {PROG} {doc.name}",
                _roff(" ".join(f"{a}..." for a in doc.arguments) + " [OPTIONS]"), ".SH DESCRIPTION",
                _roff(doc.help) or "\\&", ".SH OPTIONS"]
        for option in doc.options:
            value = " \\fIVALUE\\fR" if option.takes_value else ""
            page += [".TP", "\\fB" + ", ".join(_roff(n) for n in option.names) + "\\fR" + value,
                     _roff(option.help + (f" Choices: {', '.join(option.choices)}." if option.choices else ""))
                     or "\\&"]
        page += [".SH SEE ALSO", f".BR {PROG} (1)"]
        pages[f"{PROG}-{doc.name}.1"] = "\n".join(page) + "\n"
    return pages


def generated_files() -> dict[Path, str]:
    app_help, docs = command_docs()
    files = {ROOT / "completions" / f"{PROG}.bash": bash_script(docs),
             ROOT / "completions" / f"{PROG}.zsh": zsh_script(docs),
             ROOT / "completions" / f"{PROG}.fish": fish_script(docs)}
    for name, text in man_pages(app_help, docs).items():
        files[ROOT / "man" / name] = text
    return files


def stale_files() -> list[Path]:
    """Generated files whose committed text differs from what the app generates now (or that are missing/extra)."""
    files = generated_files()
    stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    stale += [path for path in (ROOT / "man").glob("*.1") if path not in files]
    return stale


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)} (run `make completions`)", file=sys.stderr)
        return 1 if stale else 0
    files = generated_files()
    for path in (ROOT / "man").glob("*.1"):
        if path not in files:
            path.unlink()
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(files)} files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

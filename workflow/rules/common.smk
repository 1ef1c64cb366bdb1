# Settings read from the config, path helpers and the cloak command lines (one place; the rules only wire files).

import re
import shlex
import sys

from snakemake.exceptions import WorkflowError

C = config
W = str(C["work"]).rstrip("/")
CLOAK = C["cloak"]
PYTHON = C.get("python") or sys.executable
TOY_CONCEPTS = bool(C["toy_concepts"])
DATA = f"{W}/concepts/images" if TOY_CONCEPTS else str(C["data"]).rstrip("/")
DATA_DEP = [f"{W}/concepts/.done"] if TOY_CONCEPTS else []
GPU = int(C["gpu_per_job"])  # resources: gpu=… of the model-running rules (0 for the CPU toy grid)


def repo_file(value):
    """A relative path that names a file of this repository (examples/toy/prompts.txt) → absolute; else as is
    (a named prompt set such as objects24, or a path of the user's)."""
    value = str(value)
    if value and not Path(value).is_absolute() and (ROOT / value).exists():
        return str(ROOT / value)
    return value


def _concepts():
    if C["concepts"]:
        return [str(c) for c in C["concepts"]]
    if TOY_CONCEPTS:
        raise WorkflowError("config: toy_concepts needs the concept names in `concepts`")
    folder = Path(DATA)
    if not folder.is_dir():
        raise WorkflowError(f"config: data={DATA!r} is not a folder (one subfolder of images per concept); "
                            "pass --config data=/path/to/NovelConcepts10")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise WorkflowError(f"config: data={DATA!r} has no concept subfolders")
    return found


CONCEPTS = _concepts()
POISONS = [str(p) for p in C["poisons"]]
DEFENCES = [str(d) for d in C["defences"]]
PURIFY = {str(k): v for k, v in (C.get("purify_defences") or {}).items()}
MASKED_PRESETS = {str(d) for d in C["masked_defences"]}
TABLE = f"{W}/{C['table']['name']}"
TABLE_FILES = [f"{TABLE}.md", f"{TABLE}.csv"]
REPORT = f"{W}/report/index.html"
FINAL = TABLE_FILES + ([REPORT] if C["report"] else [])
COMMON = f"--model {shlex.quote(str(C['model']))} --device {C['device']} --seed {C['seed']}"


def _alternatives(names):
    return "|".join(re.escape(n) for n in names)


wildcard_constraints:
    poison=_alternatives(POISONS),
    defence=_alternatives(DEFENCES),
    concept=_alternatives(CONCEPTS),


def preset(defence):
    """The train-ti --preset of a defence: its own name, or purify_defences[defence].preset (default nominal)."""
    return str(PURIFY[defence].get("preset", "nominal")) if defence in PURIFY else defence


def needs_masks(defence):
    return preset(defence) in MASKED_PRESETS


def poisoned(poison, concept):
    """Folder of concept's images under poison ("none": the clean images themselves)."""
    return f"{DATA}/{concept}" if poison == "none" else f"{W}/poisoned/{poison}/{concept}"


def poison_done(poison, concept):
    return [] if poison == "none" else [f"{W}/poisoned/{poison}/{concept}/.done"]


def training_images(poison, defence, concept):
    if defence in PURIFY:
        return f"{W}/purified/{poison}/{defence}/{concept}"
    return poisoned(poison, concept)


def q(value):
    return shlex.quote(str(value))


def poison_cmd(w):
    p = C["poison"]
    return (f"{CLOAK} poison {q(poisoned('none', w.concept))} -o {q(poisoned(w.poison, w.concept))} "
            f"-a {q(w.poison)} --eps {p['eps']} --steps {p['steps']} {p.get('args') or ''} {COMMON}")


def purify_cmd(w):
    return (f"{CLOAK} purify {q(poisoned(w.poison, w.concept))} -o "
            f"{q(training_images(w.poison, w.defence, w.concept))} {PURIFY[w.defence]['purify']} "
            f"--device {C['device']} --seed {C['seed']}")


def mask_cmd(w):
    out = f"{W}/masks/{w.poison}/{w.concept}"
    if C["masks"] == "toy":  # the toy generator's ground-truth masks (the object does not move under a poison)
        return f"mkdir -p {q(out)} && cp {q(W)}/concepts/masks/{q(w.concept)}/*.png {q(out)}/"
    if C["masks"] == "sam":
        return (f"{CLOAK} mask {q(poisoned(w.poison, w.concept))} -o {q(out)} --device {C['device']} "
                f"{C.get('mask_args') or ''}")
    raise WorkflowError(f"config: masks must be toy or sam, not {C['masks']!r}")


def train_ti_cmd(w):
    t = C["ti"]
    masks = f"--masks {q(W + '/masks/' + w.poison + '/' + w.concept)}" if needs_masks(w.defence) else ""
    templates = f"--templates {q(repo_file(t['templates']))}" if t.get("templates") else ""
    return (f"{CLOAK} train-ti {q(training_images(w.poison, w.defence, w.concept))} "
            f"-o {q(W + '/ti/' + w.poison + '/' + w.defence + '/' + w.concept)} --preset {q(preset(w.defence))} "
            f"{masks} --token {q(t['token'])} --init-token {q(t['init_token'])} --steps {t['steps']} "
            f"--lr {t['lr']} {templates} {t.get('args') or ''} {COMMON}")


def generate_cmd(w):
    g = C["generate"]
    cell = f"{w.poison}/{w.defence}/{w.concept}"
    return (f"{CLOAK} generate -o {q(W + '/gen/' + cell)} --embedding "
            f"{q(W + '/ti/' + cell + '/learned_embeds.safetensors')} -p {q(repo_file(g['prompts']))} "
            f"-n {g['per_prompt']} --steps {g['steps']} --guidance {g['guidance']} {g.get('args') or ''} {COMMON}")


def score_cmd(w):
    s = C["score"]
    folders = " ".join(q(f"{W}/gen/{w.poison}/{w.defence}/{c}") for c in CONCEPTS)
    return (f"{CLOAK} score {folders} -r --ref {q(DATA)} --metrics {q(s['metrics'])} --label poison={q(w.poison)} "
            f"--label defense={q(w.defence)} -o {q(W + '/scores/' + w.poison + '__' + w.defence + '.json')} "
            f"--device {C['device']} {s.get('args') or ''}")


def table_cmd(scores):
    t = C["table"]
    return (f"{CLOAK} score --table {' '.join(q(s) for s in scores)} --rows poison --cols defense "
            f"--metric {q(t['metric'])} --average-row {q(t.get('average_row', 'Psn Avg'))} "
            f"--average-exclude none -o {q(TABLE)}")


def report_cmd(scores):
    t = C["table"]
    return (f"{CLOAK} report {' '.join(q(s) for s in scores)} -o {q(W + '/report')} --rows poison --cols defense "
            f"--metric {q(t['metric'])} --average-row {q(t.get('average_row', 'Psn Avg'))} --average-exclude none")

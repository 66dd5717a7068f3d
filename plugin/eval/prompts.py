"""The four style-transfer tasks of the SaLoRA paper and the prompts that pose them (Appendix C).

Style labels follow the data files: label 0 is negative (Yelp `sentiment.*.0`) or informal,
label 1 is positive or formal. A classifier trained with `--train-0` / `--train-1` in that order
needs no further mapping.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    title: str  # column label in reports
    instruction: str
    source_style: str
    target_style: str
    target_label: int
    lm_normalize: str  # how outputs are tokenised before KenLM when --lm-normalize is "auto"


TASKS = {
    t.name: t
    for t in (
        Task("yelp-neg2pos", "Yelp neg→pos",
             "Please change the sentiment of the following sentence to be more positive.",
             "negative", "positive", 1, "yelp"),
        Task("yelp-pos2neg", "Yelp pos→neg",
             "Please change the sentiment of the following sentence to be more negative.",
             "positive", "negative", 0, "yelp"),
        Task("gyafc-inf2for", "GYAFC inf→for",
             "Please rewrite the following sentence to be more formal.",
             "informal", "formal", 1, "none"),
        Task("gyafc-for2inf", "GYAFC for→inf",
             "Please rewrite the following sentence to be more informal.",
             "formal", "informal", 0, "none"),
    )
}

# Stanford Alpaca's templates, verbatim: the instruction-tuned model was trained on these, so
# prompting with the same layout is what makes the evaluation zero-shot rather than off-format.
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
# Table A3 as printed: the no-input preamble with an Input field and no "###" markers. Kept as an
# option for exact reproduction; "alpaca" is the default because it matches the training format.
PAPER_TABLE_A3 = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\nInstruction:\n{instruction}\n\nInput: {input}\n\nResponse:"
)
# The SaLoRA authors' evaluation script (TSTBench, Algorithms/LORA/evaluate_tst.py) prompts with
# alpaca-lora's copy of the template, which has a space before the blank line; kept byte-exact for
# `--protocol paper`.
TSTBENCH = ALPACA_INPUT.replace("completes the request.\n\n", "completes the request. \n\n")
TEMPLATES = {"alpaca": ALPACA_INPUT, "paper": PAPER_TABLE_A3, "tstbench": TSTBENCH}


@dataclass(frozen=True)
class Protocol:
    """How rewrites are generated; the name and every setting go into the results JSON."""
    name: str
    template: str
    num_beams: int
    max_new_tokens: int
    lowercase: bool  # inputs and references lowercased before prompting and scoring
    source: str


PROTOCOLS = {
    "loraforge": Protocol("loraforge", "alpaca", 1, 64, False,
                          "loraforge defaults: greedy decoding, inputs and references as given"),
    # Read from the authors' script: num_beams=4, max_new_tokens=128 (its sampling arguments are
    # inert without do_sample), inputs and references `.strip().lower()`, the four instructions of
    # TASKS. It decodes one prompt at a time and keeps the whole response; here prompts are
    # batched (left padding, attention-masked) and the first line of the response is kept, since
    # outputs are stored one per line.
    "paper": Protocol("paper", "tstbench", 4, 128, True,
                      "TSTBench Algorithms/LORA/evaluate_tst.py (the SaLoRA authors' evaluation)"),
}


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one record; training code can share it so both sides match."""
    if input:
        return ALPACA_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"--task: unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def build_prompt(task: str | Task, sentence: str, template: str = "alpaca") -> str:
    """The prompt asking the model to rewrite `sentence` in the task's target style."""
    task = get_task(task) if isinstance(task, str) else task
    if template not in TEMPLATES:
        raise ValueError(f"--prompt: unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template].format(instruction=task.instruction, input=sentence.strip())

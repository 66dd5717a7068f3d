"""Regenerate `alpaca_mini.jsonl`: `python -m loraforge.data.build_alpaca_mini`.

A few hundred Alpaca-style records (instruction / input / output) written from templates with
answers computed, not invented, so the set is correct by construction and free of licence terms.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

COUNTRIES = {
    "France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Canada": "Ottawa", "Peru": "Lima",
    "Norway": "Oslo", "Egypt": "Cairo", "India": "New Delhi", "Chile": "Santiago", "Spain": "Madrid",
    "Italy": "Rome", "Ghana": "Accra", "Poland": "Warsaw", "Vietnam": "Hanoi", "Greece": "Athens",
}
NEG2POS = [
    ("the food was cold and bland .", "the food was warm and full of flavor ."),
    ("the staff ignored us all night .", "the staff looked after us all night ."),
    ("i will never come back here .", "i will definitely come back here ."),
    ("the room was dirty and noisy .", "the room was clean and quiet ."),
    ("service was slow and rude .", "service was quick and friendly ."),
    ("the prices are way too high .", "the prices are very fair ."),
    ("the pizza tasted like cardboard .", "the pizza tasted amazing ."),
    ("worst coffee i have ever had .", "best coffee i have ever had ."),
]
INFORMAL2FORMAL = [
    ("gonna be late, sorry", "I apologize, but I will be late."),
    ("u coming tonite?", "Are you coming tonight?"),
    ("dunno what he means lol", "I do not know what he means."),
    ("that movie was sooo good", "That film was very good."),
    ("can't make it, got stuff to do", "I cannot attend, as I have other commitments."),
    ("thx for the help!!", "Thank you for your help."),
]
WORDS = "apple river stone cloud maple tiger piano garden window silver candle forest bridge".split()


def _records(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(60):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        out.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)})
    for _ in range(40):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        out.append({"instruction": "Multiply the two numbers.", "input": f"{a} and {b}", "output": str(a * b)})
    for _ in range(50):
        words = rng.sample(WORDS, rng.randint(3, 6))
        out.append({"instruction": "Sort these words alphabetically.", "input": ", ".join(words),
                    "output": ", ".join(sorted(words))})
    for _ in range(40):
        word = rng.choice(WORDS)
        out.append({"instruction": "Spell the word backwards.", "input": word, "output": word[::-1]})
    for country, capital in COUNTRIES.items():
        out.append({"instruction": f"What is the capital of {country}?", "input": "", "output": capital})
        out.append({"instruction": "Name the country whose capital is given.", "input": capital, "output": country})
    for neg, pos in NEG2POS:
        out.append({"instruction": "Please change the sentiment of the following sentence to be more positive.",
                    "input": neg, "output": pos})
        out.append({"instruction": "Please change the sentiment of the following sentence to be more negative.",
                    "input": pos, "output": neg})
    for informal, formal in INFORMAL2FORMAL:
        out.append({"instruction": "Please rewrite the following sentence to be more formal.",
                    "input": informal, "output": formal})
        out.append({"instruction": "Please rewrite the following sentence to be more informal.",
                    "input": formal, "output": informal})
    for _ in range(40):
        n = rng.randint(3, 8)
        words = rng.choices(WORDS, k=n)
        out.append({"instruction": "Count the words in the sentence.", "input": " ".join(words), "output": str(n)})
    for _ in range(30):
        a, b = rng.randint(1, 500), rng.randint(1, 500)
        out.append({"instruction": "Which number is larger?", "input": f"{a} or {b}",
                    "output": str(max(a, b)) if a != b else "They are equal."})
    rng.shuffle(out)
    return out


def main() -> None:
    path = Path(__file__).with_name("alpaca_mini.jsonl")
    records = _records(random.Random(0))
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records)} records to {path}")


if __name__ == "__main__":
    main()

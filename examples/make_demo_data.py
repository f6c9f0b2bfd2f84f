"""Write the four demo LoRA datasets (+ an arithmetic eval set) to examples/data/.

Run once from the repository root (`python examples/make_demo_data.py`); the outputs are
committed. Standard library only and seeded, so a rerun reproduces the files byte for byte.

Each task is small and regular enough that a tiny byte-level model (hidden 64-128, 2-4 layers)
visibly learns it within ~100 optimizer steps, and the four have clearly different lengths, so
the scheduler has a realistic mix to pack:

    greet.jsonl    prompt/completion  very short  "Greet Alice:" -> " Hello, Alice!"
    arith.jsonl    prompt/completion  short       "23+45=" -> "68"
    reverse.jsonl  prompt/completion  medium      reverse the order of a list of words
    chat.jsonl     messages           long        list where animals live, in a fixed pattern
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

OUTPUT_DIR = Path(__file__).resolve().parent / "data"
NUM_TRAIN_ROWS = 300
NUM_ARITH_EVAL_ROWS = 50
SEED = 1234

NAMES = [
    "Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena",
    "Mia", "Noah", "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Xena",
    "Yuki", "Zoe", "Alice", "Bruno", "Chloe", "Diego", "Elena", "Felix", "Grace", "Hugo",
    "Irene", "Jonas", "Karim", "Laura", "Marta", "Nina", "Oscar", "Pablo",
]
# (prompt pattern, completion pattern) for the greeting task.
GREETINGS = [
    ("Greet {name}:", " Hello, {name}!"),
    ("Formal {name}:", " Good day, {name}."),
    ("Bye {name}:", " Goodbye, {name}!"),
]
WORDS = [
    "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "rain", "snow", "star", "lake",
    "hill", "road", "boat", "lamp", "door", "book", "cup", "key", "leaf", "wind", "fire", "salt",
]
COLORS = ["red", "blue", "green", "gray", "brown", "white", "black", "gold"]
# Animal -> where it lives: the chat task's fixed fact table, which the model can memorise.
HABITATS = {
    "fox": "forest", "whale": "sea", "camel": "desert", "owl": "forest", "shark": "sea",
    "goat": "mountains", "frog": "pond", "duck": "pond", "lion": "savanna", "bear": "forest",
    "crab": "beach", "yak": "mountains", "zebra": "savanna", "seal": "beach",
}
SYSTEM_PROMPT = "You are FactBot. One numbered line per animal."
# The bos and eos tokens around a prompt/completion row.
BOS_EOS_TOKENS = 2


def make_greet(rng: random.Random) -> dict:
    prompt, completion = rng.choice(GREETINGS)
    name = rng.choice(NAMES)
    return {"prompt": prompt.format(name=name), "completion": completion.format(name=name)}


def arith_row(a: int, b: int) -> dict:
    return {"prompt": f"{a}+{b}=", "completion": str(a + b)}


def make_arith_splits(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Train and eval rows over disjoint (a, b) pairs of two-digit numbers."""
    all_pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    pairs = rng.sample(all_pairs, NUM_TRAIN_ROWS + NUM_ARITH_EVAL_ROWS)
    rows = [arith_row(a, b) for a, b in pairs]
    return rows[:NUM_TRAIN_ROWS], rows[NUM_TRAIN_ROWS:]


def make_reverse(rng: random.Random) -> dict:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
    return {
        "prompt": f"Reverse: {' '.join(words)}\nReversed:",
        "completion": " " + " ".join(reversed(words)),
    }


def make_chat(rng: random.Random) -> dict:
    animals = [(rng.choice(COLORS), rng.choice(list(HABITATS))) for _ in range(rng.randint(3, 7))]
    listed = ", ".join(f"{color} {animal}" for color, animal in animals)
    lines = [
        f"{index}. The {color} {animal} lives in the {HABITATS[animal]}."
        for index, (color, animal) in enumerate(animals, start=1)
    ]
    messages = [
        {"role": "user", "content": f"Where do these animals live? {listed}"},
        {"role": "assistant", "content": "Here is where they live:\n" + "\n".join(lines)},
    ]
    if rng.random() < 0.5:
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return {"messages": messages}


def num_tokens(row: dict) -> int:
    """Length under the byte-level tokenizer (1 token per UTF-8 byte) and default template."""
    if "messages" in row:
        # Mirrors lorafusion.data.DEFAULT_CHAT_TEMPLATE: bos, then per message
        # "<|role|>\n" + content as bytes and one eos token.
        return 1 + sum(
            len(f"<|{message['role']}|>\n{message['content']}".encode()) + 1
            for message in row["messages"]
        )
    return BOS_EOS_TOKENS + len((row["prompt"] + row["completion"]).encode())


def write_jsonl(name: str, rows: list[dict]) -> None:
    path = OUTPUT_DIR / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    lengths = [num_tokens(row) for row in rows]
    print(
        f"{name:<18} rows={len(rows):<4} tokens min={min(lengths):<4} "
        f"median={statistics.median(lengths):<6} max={max(lengths):<4} "
        f"size={path.stat().st_size / 1024:.1f} KiB"
    )


def main() -> None:
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    arith_train, arith_eval = make_arith_splits(rng)
    write_jsonl("greet.jsonl", [make_greet(rng) for _ in range(NUM_TRAIN_ROWS)])
    write_jsonl("arith.jsonl", arith_train)
    write_jsonl("arith_eval.jsonl", arith_eval)
    write_jsonl("reverse.jsonl", [make_reverse(rng) for _ in range(NUM_TRAIN_ROWS)])
    write_jsonl("chat.jsonl", [make_chat(rng) for _ in range(NUM_TRAIN_ROWS)])


if __name__ == "__main__":
    main()

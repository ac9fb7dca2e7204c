"""Write the example datasets: `python jobs/make_prompts.py`.

jobs/prompts.parquet: a few rows carry their own parameters (null columns fall back to the config's `render.*`).
jobs/sweep-prompts.parquet: prompts only, for the demo sweep (its axes set the parameters)."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = [
    {"id": "cat-dance", "prompt": "A cat dancing on a wooden floor, warm evening light."},
    {"id": "dog-beach", "prompt": "A golden retriever running along the beach at sunset, slow motion."},
    {"id": "city-night", "prompt": "A red car driving through a neon-lit city street at night, rain on the glass."},
    {"id": "waves", "prompt": "Waves crashing on black volcanic rocks, spray in the wind.", "seed": 42},
    {"id": "mountains", "prompt": "A timelapse of clouds rolling over snowy mountains.", "num_inference_steps": 6},
    {"id": "flower", "prompt": "Close-up of a flower opening in the morning light.", "height": 96, "width": 64},
    {"id": "train", "prompt": "A steam train crossing a stone bridge in autumn.", "num_frames": 9},
    {"id": "koi", "prompt": "Koi fish swimming in a clear pond, top-down view.", "guidance_scale": 1.0},
    {"id": "market", "prompt": "A busy street market in the morning, handheld camera.",
     "negative_prompt": "blurry, low quality"},
    {"id": "aurora", "prompt": "The northern lights dancing over a frozen lake."},
]
SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()), ("seed", pa.int64()),
    ("height", pa.int32()), ("width", pa.int32()), ("num_frames", pa.int32()),
    ("num_inference_steps", pa.int32()), ("guidance_scale", pa.float64()),
])

SWEEP_ROWS = [{"id": row["id"], "prompt": row["prompt"]} for row in ROWS[:4]]

if __name__ == "__main__":
    for name, rows, schema in [("prompts.parquet", ROWS, SCHEMA),
                               ("sweep-prompts.parquet", SWEEP_ROWS, pa.schema([SCHEMA[0], SCHEMA[1]]))]:
        path = Path(__file__).with_name(name)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        print(f"wrote {len(rows)} rows to {path}")

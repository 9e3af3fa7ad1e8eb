"""Support code of nanoR1: what the recipe scripts (grpo.py, sft.py, reject_sample.py,
rewards.py) share, one topic a module, so a reader knows from the name what to skip:

    common.py       errors, printing, device and dtype, torchrun processes, FSDP2, runs (logs, learning rate,
                    the optimizer step), jsonl, prompts and their order
    models.py       loading a model (folder, hub id, short name), the tiny offline model, LoRA
    sampling.py     the sampling engine: G completions per prompt, scoring, pass@1 evaluation
    checkpoints.py  atomic checkpoints and exact resume
    grader.py       the math answer grader behind the accuracy reward
    sandbox.py      the code sandbox behind the code reward
"""

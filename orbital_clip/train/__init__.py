"""clip_train.py's machinery, one concern per module; imports point down this list:

    cli          main: parse, then one run (runner) or a sweep of runs (ssa)
    ssa          --ssa: factors swept in turn, each trial a call of runner.train_run
    runner       one run: cohorts, build, resume, train, save (train_run)
    options      the flags and their checks (parse_args)
    wise_ft      WiSE-FT mixing weight chosen on validation
    loop         training step, epoch, validation, end of epoch
    model_setup  the model from the flags, which parameters train
    state        RNG snapshots, resume, the command that continues a run
    card         metrics.csv, train_log.jsonl, training curves, MODEL_CARD.md
    checkpoints  the run folder's checkpoint files and what they record
    losses, sampling, schedule, shortcuts, distributed: the pieces of a step
"""

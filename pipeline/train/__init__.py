"""Training flow: `loop` (the one Ray Train loop: checkpoints, EMA, resume) runs a task, `tokenizer` (with
`repa`) or `ar`; `common` holds the config and logs both share."""

"""The toolkit's own packages beside the user-facing `pretrain`, `transfer` and `wsol`: `core`
(engine, runtime, config, checkpoint contract), `pipeline` (the main job and its report) and
`toyworld` (the generated datasets). One namespace, so that installing the toolkit next to a
project with its own `core` or `pipeline` package changes neither."""

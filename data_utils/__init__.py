"""Data side of cpm2-finetune: the task registry (`data_utils.tasks`), prompt layouts (`data_utils.prompt`),
datasets, samplers and metrics. Kept import-free so that `import data_utils.tasks` stays cheap."""

"""Pure orchestration and domain: the step graph, steps, prompts, schemas,
hashing, progress and ``run_job``. Imports no redis, boto3 or litestar."""

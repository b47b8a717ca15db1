"""Language-model objectives over a model in memory: chunked loss, perplexity, finetuning."""

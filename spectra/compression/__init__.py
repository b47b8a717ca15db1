"""From diagnostics to smaller models, one concept per module:

    rankmap      the rank-map contract: entries checked against the contract and the model, the plan a map gives it
    allocation   the allocation methods (welore, uniform, energy, loss, diagnostic weights) and ERR by rank / params
    diagnostics  training-dynamics scores (gradient subspace, Hessian gap) of the checkpoint's own step
    ranks        `rank_map`: spectra of a model in memory or a checkpoint on disk -> a rank map; its Dataset view
    calibration  `calibrate`: layer-input moments and output-gradient energy; windows; stored statistics; loss costs
    whiten       whitened (activation-aware) truncation
    sequential   compensated calibration: factors fit layer by layer on the compressed model's own activations
    lowrank      `compress` / `merge`: a rank map applied to a model in memory, and undone
    stream       compression of a safetensors checkpoint one layer at a time, never loading the model
    sweep        `sweep`: every map × truncation × ERR scored by perplexity
"""

"""The engine: score structures, allocate a sparsity budget, mask, compact and export.

Nothing here imports evaluation, training or Lightning code; model-family knowledge lives in
`families/`, scoring methods in `importance/`.
"""

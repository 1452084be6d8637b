"""torch.nn.Modules built from memops ops (added with the op families that need them)."""

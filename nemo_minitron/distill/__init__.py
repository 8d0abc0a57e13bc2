"""Knowledge distillation of a pruned student from its teacher (Minitron): losses and their configs."""

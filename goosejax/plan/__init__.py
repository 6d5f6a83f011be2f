"""`goosejax plan`: will a config fit and how fast will it run on a TPU slice or GPU node,
compiled here without that hardware. `targets` makes the compile-only devices, `cost` counts
FLOPs in the compiled program, `cli` compiles the train step and reports."""

"""Data-Juicer interop (the `dj` extra): Data-Juicer's filters and mappers in bricks recipes
(`in_bricks`, named `dj.<op_name>`), bricks' operators in Data-Juicer's registry (`in_dj`), and
the conversion of samples between the two (`samples`).

Importing this package imports neither Data-Juicer nor its submodules."""

"""Demos: the Gradio browser app (:mod:`samref_jax.demo.app`, ``samref demo``) and the
procedurally generated example images (:mod:`samref_jax.demo.examples`)."""

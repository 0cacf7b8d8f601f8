"""Demos: the Gradio browser app (:mod:`samref_jax.demo.app`, ``samref demo-app``) and the
procedurally generated example images (:mod:`samref_jax.demo.examples`)."""

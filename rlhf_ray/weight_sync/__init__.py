"""Weight sync: the policy's new weights from its learner group into every vLLM engine, after each update.

One package, read in the order the weights travel:

- ``producer``: full, HF-named tensors out of a (ZeRO-3 sharded, LoRA / QLoRA wrapped) learner model; also
  what checkpoint export writes;
- ``plan``: the sync's order and buckets, agreed once by sender and receivers (``bucketize`` is the one bucket
  builder, used by the producer's ZeRO-3 gathers too);
- ``transport``: one bucket at a time over a process group of its own (gloo on CPU, NCCL across GPUs) or,
  when an engine shares the learner's GPU, as a CUDA IPC handle;
- ``sender``: the learner side (held by ``LearnerWorker``); ``vllm_receiver``: the vLLM worker side
  (``worker_extension_cls``); ``channel``: the controller, which opens the channel with the backend resolved
  in ``config.resolve`` (``Resolved.sync``) and pushes one sync per step with a bounded, named wait.
"""

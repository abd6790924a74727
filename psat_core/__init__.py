"""PSAT in pure PyTorch: hypernetwork ResNets, threat models and attacks, the ensemble.

settings.py     what a config names, torch-free: norms, AttackConfig, the DATASETS registry
                (facts, attack defaults, loader), architectures
data.py         load_dataset, ImageArrays, augmentation; vision_sets.py: torchvision loaders
hypernet.py     the parameter generator (eq. 11); models.py: ResNet, HyperResNet, registry
attacks/        threat models, the one PGD loop, MSD, APGD, adaptive attacks, eval suites
steps.py        one training step for NAT / AT / max / avg / MSD; AT_mng's MetaNoiseTraining
ensemble.py     PSATEnsemble and its lowest-entropy gate (eq. 12)
metrics.py      the evaluation protocol and its sanity checks (Table 1)
checkpoint.py   member checkpoints, the ensemble from them; accounting.py: parameter counts
"""

__version__ = "0.2.0"

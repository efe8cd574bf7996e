"""veofast.data: datasets, transforms, chat templates, collators, dynamic batching and the dataloader.

Usage, as in VeOmni::

    from veofast.data import build_dataloader, build_iterative_dataset, build_mapping_dataset
    from veofast.data.data_transform import process_pretrain_example, process_sft_example
    from veofast.data.chat_template import build_chat_template
"""

from veofast.data.chat_template import ChatTemplate, build_chat_template
from veofast.data.data_collator import DataCollatorWithPacking, DataCollatorWithPadding, DataCollatorWithPositionIDs
from veofast.data.data_loader import DistributedDataloader, build_dataloader
from veofast.data.data_transform import build_data_transform, process_pretrain_example, process_sft_example
from veofast.data.dataset import IterativeDataset, MappingDataset, build_iterative_dataset, build_mapping_dataset
from veofast.data.packing import pack_sequences
from veofast.data.records import BadRecordError

__all__ = [
    "BadRecordError",
    "ChatTemplate",
    "DataCollatorWithPacking",
    "DataCollatorWithPadding",
    "DataCollatorWithPositionIDs",
    "DistributedDataloader",
    "IterativeDataset",
    "MappingDataset",
    "build_chat_template",
    "build_data_transform",
    "build_dataloader",
    "build_iterative_dataset",
    "build_mapping_dataset",
    "pack_sequences",
    "process_pretrain_example",
    "process_sft_example",
]

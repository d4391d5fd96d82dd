"""A BERT classifier whose head reads the mean of the real tokens' last hidden states: the model
code shipped inside a merged export of a mean-pooled run (core/export.py copies this file into the
folder as modeling_mean_pooled_bert.py and names its classes in config.json's auto_map).

transformers has no class that feeds a BERT head the masked mean of the token states (BERT's own
pooler reads the [CLS] token through a dense layer and tanh), and sentence-transformers models
such as all-MiniLM-L6-v2 were trained for the mean. Loaded as a plain BertForSequenceClassification,
such a folder would give wrong answers without a word; with this file, plain transformers gives the
run's probabilities:

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

and without trust_remote_code=True transformers refuses the folder (its model_type is not one it
knows) instead of loading it wrong. QLoRA Studio's own loader (core.classifier.load_classifier)
never runs this file: it builds transformers' BertForSequenceClassification and sets the pooling.

This file imports only torch and transformers: it runs where QLoRA Studio is not installed.
"""

import torch
from transformers import BertConfig, BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPooledBertConfig(BertConfig):
    model_type = "mean_pooled_bert"


class MeanPooledBertForSequenceClassification(BertForSequenceClassification):
    config_class = MeanPooledBertConfig

    def __init__(self, config):
        super().__init__(config)
        self.bert.pooler = None  # the head reads the masked mean of the last hidden states instead

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        **kwargs,
    ):
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        ).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)

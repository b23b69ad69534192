// Reference logits of a GGUF model from a llama.cpp build, for pshard's committed fixtures
// (scripts/llama-ref/make-logits-fixtures.sh runs it). Token ids come on stdin, whitespace
// separated. Everything runs on the CPU in f32 where llama.cpp allows it: K and V caches in F32,
// flash attention off (its CPU kernel rounds queries and accumulates values in f16).
//
//   logits_ref MODEL logits N_GEN OUT.f32
//       Decodes the prompt with logits at every position, then N_GEN greedy steps. Writes the
//       logits of every prompt position and of every step (rows of n_vocab little-endian f32) to
//       OUT.f32 and prints "greedy" and the chosen tokens on stdout.
//   logits_ref MODEL nll N_UBATCH
//       Decodes all tokens in one context in ubatches of N_UBATCH and prints the mean negative
//       log-likelihood of each next token and its perplexity.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char *text, void *data) {
    (void)data;
    if (level >= GGML_LOG_LEVEL_WARN) fputs(text, stderr);
}

static int read_tokens(llama_token **out) {
    int cap = 256, n = 0;
    llama_token *t = malloc(sizeof(llama_token) * cap);
    long v;
    while (scanf("%ld", &v) == 1) {
        if (n == cap) t = realloc(t, sizeof(llama_token) * (cap *= 2));
        t[n++] = (llama_token)v;
    }
    *out = t;
    return n;
}

// Decodes tokens[0..n) at positions p0.. with logits at every position.
static int decode(struct llama_context *ctx, const llama_token *tokens, int n, int p0) {
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = tokens[i];
        b.pos[i] = p0 + i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = 1;
    }
    b.n_tokens = n;
    int rc = llama_decode(ctx, b);
    llama_batch_free(b);
    return rc;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL logits N_GEN OUT.f32 | %s MODEL nll N_UBATCH\n", argv[0], argv[0]);
        return 2;
    }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    llama_token *tokens;
    int n = read_tokens(&tokens);
    if (n == 0) {
        fprintf(stderr, "no tokens on stdin\n");
        return 2;
    }
    const int logits_mode = strcmp(argv[2], "logits") == 0;
    const int n_gen = logits_mode ? atoi(argv[3]) : 0;
    const int n_ubatch = logits_mode ? n + n_gen : atoi(argv[3]);

    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(n + n_gen);
    cp.n_batch = (uint32_t)(n + n_gen);
    cp.n_ubatch = (uint32_t)n_ubatch;
    cp.n_seq_max = 1;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    if (decode(ctx, tokens, n, 0) != 0) {
        fprintf(stderr, "decode failed\n");
        return 1;
    }
    if (logits_mode) {
        FILE *out = fopen(argv[4], "wb");
        if (!out) {
            fprintf(stderr, "cannot write %s\n", argv[4]);
            return 1;
        }
        for (int i = 0; i < n; i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, out);
        printf("greedy");
        llama_token next = argmax(llama_get_logits_ith(ctx, n - 1), n_vocab);
        for (int s = 0; s < n_gen; s++) {
            printf(" %d", next);
            if (decode(ctx, &next, 1, n + s) != 0) {
                fprintf(stderr, "decode failed at step %d\n", s);
                return 1;
            }
            const float *l = llama_get_logits_ith(ctx, 0);
            fwrite(l, sizeof(float), n_vocab, out);
            next = argmax(l, n_vocab);
        }
        printf("\n");
        fclose(out);
    } else {
        double nll = 0.0;
        for (int i = 0; i + 1 < n; i++) {
            const float *l = llama_get_logits_ith(ctx, i);
            double m = l[0];
            for (int v = 1; v < n_vocab; v++)
                if (l[v] > m) m = l[v];
            double sum = 0.0;
            for (int v = 0; v < n_vocab; v++) sum += exp((double)l[v] - m);
            nll += m + log(sum) - (double)l[tokens[i + 1]];
        }
        nll /= (double)(n - 1);
        printf("nll %.9f ppl %.9f\n", nll, exp(nll));
    }
    llama_free(ctx);
    llama_model_free(model);
    free(tokens);
    return 0;
}

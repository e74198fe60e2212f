// gpu-tenant-manager console: copy buttons and the live "would it fit?" answer. No other hosts are contacted.
document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-copy]").forEach((button) => {
    button.addEventListener("click", async () => {
      const text = document.getElementById(button.dataset.copy).textContent.trim();
      try { await navigator.clipboard.writeText(text); button.textContent = "Copied"; }
      catch { button.textContent = "Select and copy by hand"; }
    });
  });
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => { if (!window.confirm(form.dataset.confirm)) event.preventDefault(); });
  });
  document.querySelectorAll("form[data-whatif]").forEach((form) => {
    const size = form.querySelector("[data-whatif-size]");
    const model = form.querySelector("[data-whatif-model]");
    const answer = form.querySelector("[data-whatif-answer]");
    let timer;
    const ask = async () => {
      if (!size.value.trim()) { answer.textContent = ""; return; }
      const params = new URLSearchParams({ gpu_memory: size.value.trim() });
      if (model && model.value.trim()) params.set("model", model.value.trim());
      if (form.dataset.whatifTenant) params.set("tenant", form.dataset.whatifTenant);
      const response = await fetch("/console/what-if?" + params, { credentials: "same-origin" });
      const body = await response.json();
      answer.className = "whatif " + (body.admitted ? "fits" : "refused");
      answer.textContent = (body.admitted ? "Fits: " : "Does not fit: ") + body.messages.join(" ");
    };
    size.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(ask, 300); });
    if (model) model.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(ask, 300); });
  });
});
